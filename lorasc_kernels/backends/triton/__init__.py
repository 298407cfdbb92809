"""Triton backend: the fused low-rank linear (``fused_linear.py``) and the in-place merge
(``merge.py``). Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.

Kernel modules are imported on first use, so importing this package needs no GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

try:
    import triton  # noqa: F401

    _IMPORT_ERROR = None
except ImportError as error:  # Triton is optional
    _IMPORT_ERROR = str(error)

__all__ = ["interpreting", "on_tensor_device", "unavailable_reason", "lorasc_linear",
           "merge_lowrank_"]


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_tensor_device(launcher):
    """Run ``launcher(tensor, ...)`` with its first tensor's GPU as the current device.

    Triton launches on the current CUDA device; without this, tensors on ``cuda:1`` while
    ``cuda:0`` is current (e.g. a model split over GPUs) would launch on the wrong GPU.
    """

    @functools.wraps(launcher)
    def run(tensor, *args, **kwargs):
        on_gpu = tensor.device.type == "cuda"
        with torch.cuda.device(tensor.device) if on_gpu else contextlib.nullcontext():
            return launcher(tensor, *args, **kwargs)

    return run


def unavailable_reason(device: torch.device) -> str | None:
    """``None`` if Triton kernels can run on ``device``, else why not."""
    if _IMPORT_ERROR is not None:
        return f"triton is not installed ({_IMPORT_ERROR})"
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return None
    return f"Triton needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"


def lorasc_linear(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed,
                  noise_seed, noise_scale):
    """See :func:`lorasc_kernels.backends.reference.lorasc_linear` (same contract)."""
    from .fused_linear import lorasc_linear as run

    return run(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed,
               noise_seed, noise_scale)


def merge_lowrank_(weight, lora_B, lora_A, coeff, rounding, seed, noise_remove, noise_add,
                   row_offset):
    """See :func:`lorasc_kernels.backends.reference.merge_lowrank_` (same bits)."""
    from .merge import merge_lowrank_ as run

    return run(weight, lora_B, lora_A, coeff, rounding, seed, noise_remove, noise_add,
               row_offset)
