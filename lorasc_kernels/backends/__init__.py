"""Backend registry: which implementation runs an op for given tensors.

A backend is a module satisfying :class:`.contract.Backend`: the primitives the
forward/backward composition (:mod:`lorasc_kernels.backends.composition`) and the merge run on,
``unavailable_reason`` and the dtypes it takes. Adding one is one module and one line of
:data:`_MODULES`; ``tests/backends/test_backend_contract.py`` then runs
the conformance suite on it.

``"torch"`` is :mod:`.reference`; ``"triton"`` and ``"cuda"`` are imported lazily, so a
missing Triton or CUDA toolchain never breaks ``import lorasc_kernels``.
"""

from __future__ import annotations

import importlib

import torch

from .contract import Backend

__all__ = ["BACKENDS", "Backend", "backend_module", "resolve_backend_name", "resolve_backend"]

# Registered backends: name → module.
_MODULES = {
    "torch": "lorasc_kernels.backends.reference",
    "triton": "lorasc_kernels.backends.triton",
    "cuda": "lorasc_kernels.backends.cuda",
}
# The names a caller may pass: "auto" or a registered backend.
BACKENDS = ("auto", *_MODULES)

# Tried in this order by backend="auto" for CUDA tensors.
_AUTO_ORDER = ("triton", "cuda")


_LOADED: dict[str, Backend] = {}


def backend_module(name: str) -> Backend:
    """The module of the backend called ``name`` (``"torch" | "triton" | "cuda"``).

    Imported once, then a dict lookup that ``torch.compile`` traces without a graph break.
    """
    module = _LOADED.get(name)
    if module is None:
        module = _LOADED[name] = importlib.import_module(_MODULES[name])
    return module


def _unavailable_reason(name: str, device: torch.device) -> str | None:
    try:
        module = backend_module(name)
    except ImportError as error:
        return f"it cannot be imported ({error})"
    return module.unavailable_reason(device)


@torch.compiler.assume_constant_result
def resolve_backend_name(name: str, device: torch.device) -> str:
    """The backend (``"torch" | "triton" | "cuda"``) that ``name`` means on ``device``.

    ``"auto"`` picks the first usable of Triton then CUDA for CUDA tensors and the torch
    reference otherwise. An explicit name that cannot run raises ``RuntimeError`` saying
    what is missing. A constant of the graph under ``torch.compile``: Dynamo runs it
    eagerly, so it also imports the resolved backend's module here, and
    :func:`backend_module` in the traced code that follows is a dict lookup (importing
    there would break the graph, and fail under ``fullgraph=True``).
    """
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        name = "torch"
        if device.type == "cuda":
            name = next(
                (
                    candidate
                    for candidate in _AUTO_ORDER
                    if _unavailable_reason(candidate, device) is None
                ),
                name,
            )
    reason = _unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"backend={name!r} is not available on {device}: {reason}")
    return name


def resolve_backend(name: str, device: torch.device) -> Backend:
    """The backend module that ``name`` means on ``device`` (see :func:`resolve_backend_name`)."""
    return backend_module(resolve_backend_name(name, device))
