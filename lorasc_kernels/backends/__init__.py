"""Backend registry: which implementation runs an op for given tensors.

A backend is a module exposing

* ``unavailable_reason(device) -> str | None``: ``None`` when it can run on ``device``;
* ``linear_forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed,
  noise_seed, noise_scale) -> (y, xa)`` and ``linear_backward(dy, x, xa, weight, lora_A,
  lora_B, <same hyper-parameters>, needs) -> grads``, on validated 2-D ``x``: the autograd
  of :mod:`lorasc_kernels.ops` (one for every backend) runs them;
* ``merge_lowrank_(weight, lora_B, lora_A, coeff, rounding, seed, noise_remove,
  noise_add, row_offset)``: in place, on validated arguments.

``"torch"`` is :mod:`.reference`; ``"triton"`` and ``"cuda"`` are imported lazily, so a
missing Triton or CUDA toolchain never breaks ``import lorasc_kernels``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

__all__ = ["BACKENDS", "backend_module", "resolve_backend_name", "resolve_backend"]

BACKENDS = ("auto", "torch", "triton", "cuda")

_MODULES = {
    "torch": "lorasc_kernels.backends.reference",
    "triton": "lorasc_kernels.backends.triton",
    "cuda": "lorasc_kernels.backends.cuda",
}

# Tried in this order by backend="auto" for CUDA tensors.
_AUTO_ORDER = ("triton", "cuda")


def backend_module(name: str) -> ModuleType:
    """The module of the backend called ``name`` (``"torch" | "triton" | "cuda"``)."""
    return importlib.import_module(_MODULES[name])


def _unavailable_reason(name: str, device: torch.device) -> str | None:
    try:
        module = backend_module(name)
    except ImportError as error:
        return f"it cannot be imported ({error})"
    return module.unavailable_reason(device)


def resolve_backend_name(name: str, device: torch.device) -> str:
    """The backend (``"torch" | "triton" | "cuda"``) that ``name`` means on ``device``.

    ``"auto"`` picks the first usable of Triton then CUDA for CUDA tensors and the torch
    reference otherwise. An explicit name that cannot run raises ``RuntimeError`` saying
    what is missing.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        if device.type == "cuda":
            for candidate in _AUTO_ORDER:
                if _unavailable_reason(candidate, device) is None:
                    return candidate
        return "torch"
    reason = _unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"backend={name!r} is not available on {device}: {reason}")
    return name


def resolve_backend(name: str, device: torch.device) -> ModuleType:
    """The backend module that ``name`` means on ``device`` (see :func:`resolve_backend_name`)."""
    return backend_module(resolve_backend_name(name, device))
