"""Installs the package, with the CUDA extension ``lorasc_kernels._C`` when it can be built.

:func:`cuda_extensions` adds the extension when torch is importable here and a CUDA build,
and nvcc is found (``lorasc_kernels/_build.py``), for ``TORCH_CUDA_ARCH_LIST`` (default sm_80
and sm_90a, sm_90 where the toolkit lacks sm_90a), with the CUTLASS GEMMs when the
``nvidia-cutlass`` headers are installed (``pip install --no-build-isolation .[cuda]``).
``pip install .`` builds in an isolated environment without torch, so it never
builds the extension; ``pip install --no-build-isolation .`` builds it against the installed
torch. ``LORASC_SKIP_CUDA_BUILD=1`` skips it; ``LORASC_FORCE_CUDA_BUILD=1`` makes a missing
toolchain an error. Without it the package stays pure Python and the CUDA backend compiles
the same sources at first use. The build prints one ``lorasc_kernels: CUDA extension ...``
line saying which (pip shows it with ``-v``). Building never probes the GPU.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
FIRST_USE = "the CUDA backend compiles it at first use (lorasc_kernels/_build.py)"
NO_TORCH = (
    "torch not importable in the build environment; pip builds in an isolated one "
    "unless given --no-build-isolation"
)


def _build_module():
    """``lorasc_kernels/_build.py`` (sources and flags), loaded without the package."""
    spec = importlib.util.spec_from_file_location(
        "lorasc_kernels_build", ROOT / "lorasc_kernels" / "_build.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _not_built(reason: str) -> tuple[list, dict, str]:
    return [], {}, f"lorasc_kernels: CUDA extension not built ({reason}); {FIRST_USE}"


def cuda_extensions():
    """``(ext_modules, cmdclass, note)``: the CUDA extension and ninja's build_ext, or
    nothing; ``note`` is the line that says which, and why."""
    if os.environ.get("LORASC_SKIP_CUDA_BUILD") == "1":
        return _not_built("LORASC_SKIP_CUDA_BUILD=1")
    force = os.environ.get("LORASC_FORCE_CUDA_BUILD") == "1"
    try:
        build = _build_module()  # imports torch
    except ImportError as error:
        if force:
            raise RuntimeError(f"LORASC_FORCE_CUDA_BUILD=1 but no torch: {error}") from error
        return _not_built(NO_TORCH)
    reason = build.missing_toolchain()
    if reason is not None:
        if force:
            raise RuntimeError(f"LORASC_FORCE_CUDA_BUILD=1 but {reason}")
        return _not_built(reason)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build.default_arch_list())
    extension = CUDAExtension("lorasc_kernels._C", **build.extension_kwargs())
    note = (
        f"lorasc_kernels: building the CUDA extension lorasc_kernels._C against torch "
        f"{build.torch.__version__}, TORCH_CUDA_ARCH_LIST="
        f"{os.environ['TORCH_CUDA_ARCH_LIST']} (minutes)"
    )
    return [extension], {"build_ext": BuildExtension}, note


def announcing_build_py(note: str) -> type:
    """``build_py`` that prints ``note`` on stderr once per build (wheel or editable)."""

    class BuildPy(build_py):
        def run(self):
            print(note, file=sys.stderr, flush=True)
            super().run()

    return BuildPy


if __name__ == "__main__":
    extensions, cmdclass, note = cuda_extensions()
    setup(ext_modules=extensions, cmdclass={**cmdclass, "build_py": announcing_build_py(note)})
