"""Argument checks shared by the public API: each error names the argument and what was expected."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# float64 is accepted by the torch backend only (gradcheck, float64 oracles).
REFERENCE_DTYPES = FLOAT_DTYPES + (torch.float64,)


def check_tensor(name: str, value, dims: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in REFERENCE_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype in "
            f"{[str(d) for d in REFERENCE_DTYPES]}, got {value.dtype}"
        )
    if dims is not None and value.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(value.shape)}")
    return value


def check_shape(name: str, value: torch.Tensor, expected: tuple[int, ...], meaning: str):
    if tuple(value.shape) != expected:
        raise ValueError(
            f"{name} must have shape {expected} ({meaning}), got {tuple(value.shape)}"
        )


def check_same_device(**tensors):
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, tensor in named[1:]:
        if tensor.device != first.device:
            raise ValueError(
                f"{name} is on {tensor.device} but {first_name} is on {first.device}: "
                "all tensors must be on one device"
            )


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_float(name: str, value, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_probability(name: str, value) -> float:
    value = check_float(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def check_seed(name: str, value) -> int:
    return check_int(name, value, 0, 2**64 - 1)


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_noise_pair(name: str, value) -> tuple[int, float] | None:
    """``None`` or a ``(seed, scale)`` pair with an int seed and a finite scale."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be None or a (seed, scale) pair, got {value!r}")
    return check_seed(f"{name}[0] (seed)", value[0]), check_float(f"{name}[1] (scale)", value[1])
