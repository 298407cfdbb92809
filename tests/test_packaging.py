"""The package a user installs: ``python -m build`` makes an sdist that holds ``csrc/`` and,
from it, a wheel; the wheel installs into a fresh virtual environment and runs a LoRASC
layer there; the sdist installs with ``LORASC_SKIP_CUDA_BUILD=1``, and without torch in the
build environment (as in pip's isolated build) says that the CUDA extension compiles at first
use.

The fresh environments get no package index: torch (and the build backend, setuptools)
come from the running environment through a path file, as a user's own torch would.
"""

import importlib.util
import os
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# No PYTHONPATH: a checkout on it would shadow the installed package.
ENVIRONMENT = {
    **{key: value for key, value in os.environ.items() if key != "PYTHONPATH"},
    "LORASC_SKIP_CUDA_BUILD": "1",
    "PIP_NO_INDEX": "1",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "TRITON_INTERPRET": "0",
}

# Run in the fresh environment: the installed package, not the checkout, runs a layer.
LAYER_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import lorasc_kernels
    from lorasc_kernels import LoRASCLinear, merge_lowrank_

    assert lorasc_kernels.__file__.startswith(sys.prefix), lorasc_kernels.__file__
    torch.manual_seed(0)
    layer = LoRASCLinear.from_linear(torch.nn.Linear(12, 7), r=3, lora_alpha=6)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 12, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad.shape == (5, 12) and layer.lora_A.grad.abs().sum() > 0
    before = layer.weight.detach().clone()
    with torch.no_grad():
        merge_lowrank_(layer.weight, layer.lora_B, layer.lora_A, 0.5)
    assert not torch.equal(layer.weight, before)
    print("layer ok")
    """
)


def _run(command, cwd=ROOT, env=ENVIRONMENT):
    result = subprocess.run(
        [str(part) for part in command],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """``python -m build``'s output folder: the sdist, and the wheel built from it."""
    pytest.importorskip("build", reason="python -m build needs the `build` package (dev extra)")
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT])
    return out


def _site_packages(python: Path) -> Path:
    return Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )


def _borrow_packages(python: Path):
    """Let ``python``'s environment see this environment's packages (torch, setuptools) as a
    fallback."""
    borrowed = {sysconfig.get_path("purelib"), str(Path(torch.__file__).parent.parent)}
    (_site_packages(python) / "borrowed_packages.pth").write_text(
        "\n".join(sorted(borrowed)) + "\n"
    )


def _fresh_environment(path: Path) -> Path:
    """A new virtual environment that sees this environment's packages only as a fallback
    (torch, setuptools); returns its python."""
    venv.create(path, with_pip=False)
    python = path / "bin" / "python"
    _borrow_packages(python)
    return python


def _environment_without_torch(path: Path) -> Path:
    """A new virtual environment with only the build backend (setuptools, linked from this
    environment), like the one pip builds in by default; returns its python."""
    venv.create(path, with_pip=False)
    python = path / "bin" / "python"
    source = Path(importlib.util.find_spec("setuptools").origin).parent.parent
    for pattern in (
        "setuptools",
        "setuptools-*.dist-info",
        "_distutils_hack",
        "distutils-precedence.pth",
    ):
        for found in source.glob(pattern):
            (_site_packages(python) / found.name).symlink_to(found)
    assert subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0
    return python


def _install(python: Path, target: Path):
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "--no-deps",
            "--no-build-isolation",
            target,
        ]
    )


def test_sdist_holds_the_cuda_sources_and_the_docs(dist):
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for source in (
        "csrc/fused_linear.cu",
        "csrc/merge.cu",
        "csrc/bindings.cpp",
        "csrc/lorasc/weight_types.h",
        "setup.py",
        "lorasc_kernels/_build.py",
        "docs/design.md",
    ):
        assert source in names, source


def test_wheel_holds_the_package_and_no_tests(dist):
    (wheel,) = dist.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lorasc_kernels/backends/triton/fused_linear.py" in names
    for module in (  # every subpackage ships
        "backends/composition.py",
        "cascade/schedule.py",
        "formats/registry.py",
        "integrations/peft_adapter.py",
    ):
        assert f"lorasc_kernels/{module}" in names, module
    assert not any(name.startswith(("tests/", "benchmarks/", "examples/")) for name in names)


def test_wheel_installs_in_a_fresh_environment_and_runs_a_layer(dist, tmp_path):
    python = _fresh_environment(tmp_path / "venv")
    (wheel,) = dist.glob("*.whl")
    _install(python, wheel)
    assert "layer ok" in _run([python, "-c", LAYER_SCRIPT], cwd=tmp_path).stdout


def test_sdist_installs_without_the_cuda_build(dist, tmp_path):
    python = _fresh_environment(tmp_path / "venv")
    (sdist,) = dist.glob("*.tar.gz")
    _install(python, sdist)
    assert "layer ok" in _run([python, "-c", LAYER_SCRIPT], cwd=tmp_path).stdout


def test_install_without_torch_in_the_build_environment_says_so(dist, tmp_path):
    """``pip install .`` builds where torch is absent: no extension, and the build's line
    (``pip -v`` shows it) says that the CUDA backend compiles it at first use."""
    python = _environment_without_torch(tmp_path / "venv")
    (sdist,) = dist.glob("*.tar.gz")
    environment = {k: v for k, v in ENVIRONMENT.items() if k != "LORASC_SKIP_CUDA_BUILD"}
    result = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "-v",
            "--no-deps",
            "--no-build-isolation",
            sdist,
        ],
        env=environment,
    )
    assert (
        "lorasc_kernels: CUDA extension not built (torch not importable in the build "
        "environment; pip builds in an isolated one unless given --no-build-isolation); "
        "the CUDA backend compiles it at first use"
    ) in result.stdout + result.stderr
    package = _site_packages(python) / "lorasc_kernels"
    assert (package / "_build.py").is_file() and not list(package.glob("_C*"))
    _borrow_packages(python)  # the user's torch, installed after the package
    assert "layer ok" in _run([python, "-c", LAYER_SCRIPT], cwd=tmp_path).stdout
