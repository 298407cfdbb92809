"""The CUDA extension compiles and loads without a GPU, registers its ops, and checks its
arguments; setup.py's extension hook honours its switches. The compile (a few minutes on
two cores, cached by ninja in LORASC_BUILD_DIR) happens here, not in ``pip install``."""

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lorasc_kernels import _build

ROOT = Path(__file__).resolve().parents[2]
OPS = ("lowrank_gemm", "lowrank_gemm_route", "dropout", "merge_lowrank_")

needs_toolchain = pytest.mark.skipif(
    _build.missing_toolchain() is not None,
    reason=f"cannot build the CUDA extension: {_build.missing_toolchain()}",
)


@pytest.fixture(scope="module")
def extension():
    from lorasc_kernels.backends import cuda

    module = _build.load_extension()
    cuda.extension_ops()  # registers the fake kernels
    return module


@needs_toolchain
def test_every_op_is_registered(extension):
    for name in OPS:
        schema = getattr(torch.ops.lorasc_cuda, name).default._schema
        assert schema.name == f"lorasc_cuda::{name}"
    merge = torch.ops.lorasc_cuda.merge_lowrank_.default._schema
    weight = merge.arguments[0]
    assert weight.name == "weight" and weight.alias_info.is_write
    assert not any(arg.alias_info for arg in merge.arguments[1:])
    assert merge.returns == []


@needs_toolchain
def test_fake_kernels_give_shapes(extension):
    p, q = torch.empty(37, 91, device="meta"), torch.empty(53, 91, device="meta")
    u, v = torch.empty(37, 5, device="meta"), torch.empty(53, 5, device="meta")
    out = torch.ops.lorasc_cuda.lowrank_gemm(
        p, q, None, u, v, 2.0, 0, 0, 0, 0.0, False, 1, 7, 0, 0.1, True
    )
    assert out.shape == (37, 53) and out.device.type == "meta"
    x = torch.empty(37, 91, device="meta").t()
    assert torch.ops.lorasc_cuda.dropout(x, 7, 100, 1.5).is_contiguous()


@needs_toolchain
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda e, t: e.lowrank_gemm(
                t(4, 8), t(3, 8), None, None, None, 1.0, 0, 0, 0, 0.0, False, 0, 0, 0, 0.0, False
            ),
            "p must be a CUDA tensor",
        ),
        (lambda e, t: e.lowrank_gemm_route(t(4, 8), t(3, 8), 0, 0), "p must be a CUDA tensor"),
        (lambda e, t: e.dropout(t(4, 8), 1, 2, 1.0), "x must be a CUDA tensor"),
        (
            lambda e, t: e.merge_lowrank_(
                t(4, 8), t(4, 2), t(2, 8), 1.0, True, 1, -1, 0.0, -1, 0.0, 0
            ),
            "weight must be a CUDA tensor",
        ),
    ],
)
def test_ops_name_the_bad_argument(extension, call, message):
    with pytest.raises(RuntimeError, match=message):
        call(torch.ops.lorasc_cuda, torch.randn)


def load_setup_py():
    spec = importlib.util.spec_from_file_location("lorasc_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself only runs as __main__
    return module


@needs_toolchain
def test_setup_builds_the_extension_with_a_cuda_toolchain(monkeypatch):
    monkeypatch.delenv("LORASC_SKIP_CUDA_BUILD", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    extensions, cmdclass, note = load_setup_py().cuda_extensions()
    assert [e.name for e in extensions] == ["lorasc_kernels._C"]
    assert note.startswith("lorasc_kernels: building the CUDA extension lorasc_kernels._C")
    assert sorted(extensions[0].sources) == sorted(_build.extension_kwargs()["sources"])
    assert all((ROOT / source).is_file() for source in extensions[0].sources)
    assert "build_ext" in cmdclass
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == _build.default_arch_list()


def test_setup_switches(monkeypatch):
    setup_py = load_setup_py()
    monkeypatch.setenv("LORASC_SKIP_CUDA_BUILD", "1")
    assert setup_py.cuda_extensions() == (
        [],
        {},
        "lorasc_kernels: CUDA extension not built "
        "(LORASC_SKIP_CUDA_BUILD=1); " + setup_py.FIRST_USE,
    )
    monkeypatch.delenv("LORASC_SKIP_CUDA_BUILD")
    monkeypatch.setattr(torch.version, "cuda", None)  # as with a CPU-only torch
    extensions, cmdclass, note = setup_py.cuda_extensions()
    assert (extensions, cmdclass) == ([], {})
    assert "not built (torch is a CPU-only build" in note and "compiles it at first use" in note
    monkeypatch.setenv("LORASC_FORCE_CUDA_BUILD", "1")
    with pytest.raises(RuntimeError, match="LORASC_FORCE_CUDA_BUILD=1 but torch is a CPU-only"):
        setup_py.cuda_extensions()


def test_cuda_backend_is_unavailable_for_cpu_tensors():
    from lorasc_kernels.backends import cuda

    assert "needs CUDA tensors" in cuda.unavailable_reason(torch.device("cpu"))


def make_toolkit(root: Path) -> Path:
    """A fake CUDA toolkit at ``root``: ``bin/nvcc``, the runtime header and libcudart."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "targets" / "x86_64-linux" / "lib").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'nvcc: fake'\n")
    nvcc.chmod(0o755)
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / "targets" / "x86_64-linux" / "lib" / "libcudart.so.13").write_text("")
    return root


def make_wrapper(folder: Path, nvcc: Path) -> Path:
    """``folder/nvcc``: a shell script that runs ``nvcc``, as ``/usr/local/bin/nvcc`` may."""
    folder.mkdir(parents=True, exist_ok=True)
    wrapper = folder / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {nvcc} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def test_cuda_home_follows_a_wrapper_nvcc_to_its_toolkit(tmp_path, monkeypatch):
    toolkit = make_toolkit(tmp_path / "cuda-13.0")
    (tmp_path / "cuda").symlink_to(toolkit)  # the wrapper runs a path through a link
    make_wrapper(tmp_path / "wrappers", tmp_path / "cuda" / "bin" / "nvcc")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path / 'wrappers'}{os.pathsep}{os.environ['PATH']}")
    home = _build.find_cuda_home()
    assert home.path == toolkit
    assert home.source.startswith(f"nvcc on PATH {tmp_path / 'wrappers' / 'nvcc'}")
    assert home.rejected == ()


def test_cuda_home_rejects_broken_candidates_with_reasons(tmp_path, monkeypatch):
    incomplete = tmp_path / "incomplete"
    make_toolkit(incomplete)
    for library in incomplete.glob("targets/*/lib/libcudart*"):
        library.unlink()
    toolkit = make_toolkit(tmp_path / "good")
    make_wrapper(tmp_path / "first", incomplete / "bin" / "nvcc")
    make_wrapper(tmp_path / "second", toolkit / "bin" / "nvcc")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "missing"))
    monkeypatch.setenv(
        "PATH",
        os.pathsep.join([str(tmp_path / "first"), str(tmp_path / "second"), os.environ["PATH"]]),
    )
    home = _build.find_cuda_home()
    assert home.path == toolkit
    reasons = dict(home.rejected)
    assert reasons[f"CUDA_HOME={tmp_path / 'missing'}"] == f"no {tmp_path / 'missing/bin/nvcc'}"
    assert "no libcudart.so*" in next(r for c, r in home.rejected if "first" in c)
    report = home.report()
    assert f"CUDA_HOME={toolkit}" in report.splitlines()[0] and "rejected" in report


def test_stale_lock_of_a_killed_build_is_removed(tmp_path):
    lock = tmp_path / "lock"
    lock.write_text("")
    assert not _build.clear_stale_lock(tmp_path, max_age_s=60)  # a build may be running
    assert lock.exists()
    old = time.time() - 120
    os.utime(lock, (old, old))
    assert _build.clear_stale_lock(tmp_path, max_age_s=60)
    assert not lock.exists()


def test_compile_at_first_use_says_so_once(tmp_path, monkeypatch, caplog):
    from torch.utils import cpp_extension

    def load(name, build_directory, **_):
        Path(build_directory, f"{name}.so").write_text("")
        return name

    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setenv("LORASC_BUILD_DIR", str(tmp_path))
    with caplog.at_level("WARNING", logger=_build.logger.name):
        assert _build._compile("9.0", verbose=False) == _build.JIT_NAME
        assert _build._compile("9.0", verbose=False) == _build.JIT_NAME
    (record,) = caplog.records
    assert "compiling the CUDA extension at its first use" in record.getMessage()


def test_prebuilt_extension_that_is_missing_is_an_error_not_a_build(tmp_path, monkeypatch):
    monkeypatch.setattr(_build, "_loaded", None)
    monkeypatch.setenv("LORASC_CUDA_EXTENSION", str(tmp_path / "lorasc_kernels_cuda.so"))
    with pytest.raises(RuntimeError, match="does not exist .* not building"):
        _build.load_extension()


@needs_toolchain
def test_build_step_resolves_the_real_toolkit_behind_a_wrapper_nvcc(extension, tmp_path):
    """The GPU check's build step (``python -m lorasc_kernels._build --build``) with
    ``CUDA_HOME`` unset and a wrapper ``nvcc`` first on ``PATH``: torch alone would guess
    the wrapper's parent folder and fail to link; the build resolves the real toolkit
    (the same as this process's, so the cached build is reused) and loads."""
    real = _build.find_cuda_home().path
    wrapper = make_wrapper(tmp_path / "bin", real / "bin" / "nvcc")
    environment = {
        key: value for key, value in os.environ.items() if key not in ("CUDA_HOME", "CUDA_PATH")
    }
    environment["PATH"] = f"{wrapper.parent}{os.pathsep}{environment['PATH']}"
    environment["PYTHONPATH"] = str(ROOT)
    # As in the GPU check, whose later steps load the file this step builds.
    environment["LORASC_CUDA_EXTENSION"] = str(tmp_path / "not_built_yet.so")
    result = subprocess.run(
        [sys.executable, "-m", "lorasc_kernels._build", "--build"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"CUDA_HOME={real} (nvcc on PATH {wrapper} (runs {real}/bin/nvcc))" in result.stderr
    built = Path(result.stdout.splitlines()[-1])
    assert built.is_file() and built.suffix == ".so"
    assert built.samefile(extension.__file__)
