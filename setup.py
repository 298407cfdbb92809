"""Installs the package, with the CUDA extension ``lorasc_kernels._C`` when it can be built.

:func:`cuda_extensions` adds the extension when torch is a CUDA build and nvcc is found
(``torch.utils.cpp_extension.CUDA_HOME``), for ``TORCH_CUDA_ARCH_LIST`` (default sm_80 and
sm_90). ``LORASC_SKIP_CUDA_BUILD=1`` skips it; ``LORASC_FORCE_CUDA_BUILD=1`` makes a
missing toolchain an error. Without it the package stays pure Python and the CUDA backend
compiles the same sources at first use (``lorasc_kernels/_build.py``). Building never
probes the GPU.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _build_module():
    """``lorasc_kernels/_build.py`` (sources and flags), loaded without the package."""
    spec = importlib.util.spec_from_file_location(
        "lorasc_kernels_build", ROOT / "lorasc_kernels" / "_build.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_extensions():
    """``(ext_modules, cmdclass)``: the CUDA extension and ninja's build_ext, or nothing."""
    if os.environ.get("LORASC_SKIP_CUDA_BUILD") == "1":
        return [], {}
    force = os.environ.get("LORASC_FORCE_CUDA_BUILD") == "1"
    try:
        build = _build_module()  # imports torch
    except ImportError as error:
        if force:
            raise RuntimeError(f"LORASC_FORCE_CUDA_BUILD=1 but no torch: {error}") from error
        return [], {}
    reason = build.missing_toolchain()
    if reason is not None:
        if force:
            raise RuntimeError(f"LORASC_FORCE_CUDA_BUILD=1 but {reason}")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build.DEFAULT_ARCH_LIST)
    extension = CUDAExtension("lorasc_kernels._C", **build.extension_kwargs())
    return [extension], {"build_ext": BuildExtension}


if __name__ == "__main__":
    extensions, cmdclass = cuda_extensions()
    setup(ext_modules=extensions, cmdclass=cmdclass)
