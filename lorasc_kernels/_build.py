"""Building the CUDA extension in ``csrc/``: one list of sources and flags for both paths.

* ``setup.py`` builds ``lorasc_kernels._C`` from :func:`extension_kwargs` when torch is a
  CUDA build and nvcc is found (``LORASC_SKIP_CUDA_BUILD=1`` skips it,
  ``LORASC_FORCE_CUDA_BUILD=1`` makes a missing toolchain an error).
* Otherwise :func:`load_extension` compiles the same sources with
  ``torch.utils.cpp_extension.load`` (ninja) at first use, into a cache folder
  (``LORASC_BUILD_DIR``, default ``~/.cache/lorasc_kernels``), for ``TORCH_CUDA_ARCH_LIST``
  or, if unset, the capability of the given device or :data:`DEFAULT_ARCH_LIST`.
* :func:`load_host_check` compiles the shared element-wise headers with the host C++
  compiler, for the bit-exactness tests on machines without a GPU.

Nothing here runs at import time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import ModuleType

import torch

__all__ = [
    "CSRC",
    "CUDA_SOURCES",
    "DEFAULT_ARCH_LIST",
    "extension_kwargs",
    "missing_toolchain",
    "load_extension",
    "load_host_check",
]

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CUDA_SOURCES = ("bindings.cpp", "fused_linear.cu", "merge.cu")
HOST_CHECK_SOURCES = ("host_check.cpp",)
# Ampere and Hopper; no Hopper-only instructions are used, so no sm_90a.
DEFAULT_ARCH_LIST = "8.0;9.0"

# The C++ standard is torch's own (C++17 or C++20 by version). -ffp-contract=off: the host
# build must not fuse the reference's separate multiply and add.
CXX_FLAGS = ["-O3", "-ffp-contract=off"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]

_loaded: ModuleType | None = None


def extension_kwargs() -> dict:
    """Sources (relative to the repository root) and flags of ``lorasc_kernels._C``."""
    return {
        "sources": [f"csrc/{name}" for name in CUDA_SOURCES],
        "include_dirs": [str(CSRC)],
        "extra_compile_args": {"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
    }


def missing_toolchain() -> str | None:
    """Why the extension cannot be compiled here (CPU torch, no nvcc), or None."""
    if torch.version.cuda is None:
        return "torch is a CPU-only build (the CUDA backend needs a CUDA build of torch)"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return "nvcc was not found: install the CUDA toolkit or set CUDA_HOME"
    if not all((CSRC / name).is_file() for name in CUDA_SOURCES):
        return f"the CUDA sources are missing from {CSRC} (install from a source checkout)"
    return None


def _arch_list(device: torch.device | None) -> str:
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        return f"{major}.{minor}"
    return DEFAULT_ARCH_LIST


def _build_dir(tag: str) -> Path:
    root = Path(os.environ.get("LORASC_BUILD_DIR", Path.home() / ".cache" / "lorasc_kernels"))
    path = root / re.sub(r"[^A-Za-z0-9_.-]", "_", f"torch{torch.__version__}-{tag}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_extension(device: torch.device | None = None, verbose: bool = False) -> ModuleType:
    """The compiled extension: ``lorasc_kernels._C`` if installed, else built and cached.

    Loading registers the ``torch.ops.lorasc_cuda`` ops. Raises ``RuntimeError`` saying
    what is missing when it cannot be built.
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    try:
        from lorasc_kernels import _C  # built by setup.py
    except ImportError:
        reason = missing_toolchain()
        if reason is not None:
            raise RuntimeError(f"cannot build the CUDA extension: {reason}") from None
        _C = _compile(_arch_list(device), verbose)
    _loaded = _C
    return _C


def _compile(arch_list: str, verbose: bool) -> ModuleType:
    from torch.utils import cpp_extension

    previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    try:
        return cpp_extension.load(
            name="lorasc_kernels_cuda",
            sources=[str(CSRC / name) for name in CUDA_SOURCES],
            extra_include_paths=[str(CSRC)],
            extra_cflags=CXX_FLAGS,
            extra_cuda_cflags=NVCC_FLAGS,
            build_directory=str(_build_dir(f"cu{torch.version.cuda}-sm{arch_list}")),
            verbose=verbose,
        )
    finally:
        if previous is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous


def load_host_check(verbose: bool = False) -> ModuleType:
    """Host (g++) build of ``csrc/lorasc/*.cuh`` with a few test entry points."""
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name="lorasc_host_check",
        sources=[str(CSRC / name) for name in HOST_CHECK_SOURCES],
        extra_include_paths=[str(CSRC)],
        extra_cflags=CXX_FLAGS,
        build_directory=str(_build_dir("host")),
        verbose=verbose,
    )
