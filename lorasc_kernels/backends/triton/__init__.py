"""Triton backend: the primitives of :class:`~lorasc_kernels.backends.contract.Backend` as
Triton kernels. Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.

* ``gemm_dispatch.py``: ``lowrank_gemm``, the fused low-rank GEMM, by the variant measured
  fastest per problem: ``fused_linear.py`` (tiled, with its load-time noise),
  ``fused_linear_tma.py`` (persistent, TMA-fed, Hopper) or two cuBLAS ``addmm`` calls;
  a scaled (fp8) weight by ``fused_linear_scaled.py`` (tiled, the weight as the MMA's
  register operand) or ``fused_linear_scaled_tma.py`` (persistent, TMA-fed);
* ``thin.py``: ``dropout_lowrank`` / ``dropout_lowrank_grad``, the thin products with the
  dropout mask regenerated on load;
* ``fp8_compute.py``: ``quantize_rows`` and ``scaled_rows_gemm``, the fp8 compute mode's
  primitives (rows quantized into e4m3 with the thin product, GEMMs on two fp8 operands);
* ``merge.py``: ``merge_``, the in-place merge (a scaled weight's in ``merge_scaled.py``;
  the tile's update, shared, in ``merge_update.py``);
* ``device.py`` and ``random.py``: device functions the kernels share; ``configs.py``: tile
  configurations.

Kernel modules are imported on first use, so importing this package needs no GPU.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from ...formats.registry import KERNEL_DTYPES, SCALED_DTYPES

try:
    import triton  # noqa: F401

    _IMPORT_ERROR = None
except ImportError as error:  # Triton is optional
    _IMPORT_ERROR = str(error)

__all__ = [
    "WEIGHT_DTYPES",
    "SCALED_WEIGHT_DTYPES",
    "COMPUTE_MODES",
    "interpreting",
    "on_tensor_device",
    "unavailable_reason",
    "lowrank_gemm",
    "dropout_lowrank",
    "dropout_lowrank_grad",
    "merge_",
    "quantize_rows",
    "scaled_rows_gemm",
]

WEIGHT_DTYPES = KERNEL_DTYPES
SCALED_WEIGHT_DTYPES = SCALED_DTYPES
COMPUTE_MODES = ("fp8",)  # quantize_rows and scaled_rows_gemm (fp8_compute.py)

# Primitive of the backend contract → the kernel module defining it.
_PRIMITIVES = {
    "lowrank_gemm": "gemm_dispatch",
    "dropout_lowrank": "thin",
    "dropout_lowrank_grad": "thin",
    "merge_": "merge",
    "quantize_rows": "fp8_compute",
    "scaled_rows_gemm": "fp8_compute",
}


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_tensor_device(launcher):
    """Run ``launcher(tensor, ...)`` with its first argument's GPU as the current device (a
    tensor or a :class:`~lorasc_kernels.formats.scaled_weight.ScaledWeight`).

    Triton launches on the current CUDA device; without this, tensors on ``cuda:1`` while
    ``cuda:0`` is current (e.g. a model split over GPUs) would launch on the wrong GPU. A
    process that sees at most one GPU needs no switch: the launcher is returned as it is
    (no wrapper, no check: a microsecond saved per call).
    """
    if torch.cuda.device_count() <= 1:
        return launcher

    @functools.wraps(launcher)
    def run(tensor, *args, **kwargs):
        device = tensor.device
        if device.type != "cuda" or device.index == torch.cuda.current_device():
            return launcher(tensor, *args, **kwargs)  # no device switch: µs saved per call
        with torch.cuda.device(device):
            return launcher(tensor, *args, **kwargs)

    return run


def unavailable_reason(device: torch.device) -> str | None:
    """``None`` if Triton kernels can run on ``device``, else why not."""
    if _IMPORT_ERROR is not None:
        return f"triton is not installed ({_IMPORT_ERROR})"
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return None
    return f"Triton needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"


def __getattr__(name: str):
    """The backend's primitives, imported from their kernel module on first use and then
    kept as attributes of this module (later uses do not come here)."""
    if name not in _PRIMITIVES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    primitive = getattr(importlib.import_module(f".{_PRIMITIVES[name]}", __name__), name)
    globals()[name] = primitive
    return primitive
