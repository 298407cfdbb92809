"""Argument checks shared by the public API: each error names the argument and what was expected."""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .formats.registry import REFERENCE_DTYPES, dtype_names


def check_tensor(name: str, value, dims: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in REFERENCE_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype in "
            f"{dtype_names(REFERENCE_DTYPES)}, got {value.dtype}"
        )
    if dims is not None and value.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(value.shape)}")
    return value


def check_no_overlap(name: str, tensor: torch.Tensor) -> None:
    """No two elements of ``tensor`` share memory, as an in-place write needs: its dims of
    size > 1, by increasing stride, each stride past the span of the dims before it (a
    zero stride or an ``as_strided`` view over shared elements is refused)."""
    span = 1  # 1 + the largest offset reached by the dims so far
    for stride, size in sorted(
        (s, n) for s, n in zip(tensor.stride(), tensor.shape, strict=True) if n > 1
    ):
        if stride < span:
            raise ValueError(
                f"{name} has overlapping elements (shape {tuple(tensor.shape)}, strides "
                f"{tensor.stride()}) and cannot be updated in place; pass a tensor that owns "
                "its elements"
            )
        span += stride * (size - 1)


def check_disjoint(tensors: dict[str, torch.Tensor]) -> None:
    """No two of ``tensors`` (by name) may share memory: the byte range each spans (from
    its first element to its last) meets no other's. Conservative for interleaved views of
    one buffer, which are refused too."""
    spans = []
    for name, tensor in tensors.items():
        if tensor.numel() == 0 or tensor.is_meta:  # no memory to share
            continue
        reach = sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride(), strict=True))
        start = tensor.data_ptr()
        spans.append((start, start + (reach + 1) * tensor.element_size(), name))
    spans.sort()
    end, last = 0, None
    for start, stop, name in spans:
        if last is not None and start < end:
            first, second = sorted((last, name), key=list(tensors).index)
            raise ValueError(
                f"{first} and {second} share memory: an in-place merge would overwrite one "
                "with the other; pass tensors that do not alias"
            )
        if stop > end:
            end, last = stop, name


def check_saved_like(where: str, saved, like: torch.Tensor) -> None:
    """A tensor read from a checkpoint (``where``) can replace ``like``: a tensor of its shape
    and dtype, holding values (not meta), all finite."""
    if (
        not isinstance(saved, torch.Tensor)
        or saved.shape != like.shape
        or saved.dtype != like.dtype
    ):
        raise ValueError(
            f"{where} must be a tensor of shape {tuple(like.shape)} and dtype {like.dtype}, "
            f"got {saved!r:.80}"
        )
    check_saved_values(where, saved)


def check_saved_values(where: str, saved: torch.Tensor) -> None:
    """A tensor read from a checkpoint (``where``) holds values (not meta), all finite."""
    if saved.is_meta:
        raise ValueError(f"{where} is on the meta device: it holds no values")
    if not bool(torch.isfinite(saved).all()):
        raise ValueError(f"{where} has non-finite values")


def check_shape(name: str, value: torch.Tensor, expected: tuple[int, ...], meaning: str):
    if tuple(value.shape) != expected:
        raise ValueError(f"{name} must have shape {expected} ({meaning}), got {tuple(value.shape)}")


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
    """``value`` as a Python int: any integral number but a bool (numpy integers too)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_float(name: str, value, minimum: float | None = None) -> float:
    """``value`` as a finite Python float: any real number but a bool (numpy scalars too)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    # x − x is 0 exactly for finite x (NaN for ±inf and NaN); unlike math.isfinite it also
    # holds symbolically for a float that torch.compile traces as an input (a SymFloat).
    if not value - value == 0.0:
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


def check_layer_dtype(name: str, dtype) -> None:
    """``dtype`` (None: torch's default) must be a floating dtype the package computes in."""
    if dtype is not None and dtype not in REFERENCE_DTYPES:
        raise TypeError(
            f"{name} must be None or a floating dtype in "
            f"{dtype_names(REFERENCE_DTYPES)}, got {dtype}"
        )


def layer_label(name: str) -> str:
    """How errors name a layer: its module path, or the model itself for the root."""
    return repr(name) if name else "'' (the model itself)"


@contextmanager
def naming_layer(name: str) -> Iterator[None]:
    """Re-raise a ``TypeError``/``ValueError`` from inside with the layer's module path first."""
    try:
        yield
    except (TypeError, ValueError) as error:
        raise type(error)(f"layer {layer_label(name)}: {error}") from error


def check_writable(name: str, tensor: torch.Tensor) -> None:
    """``tensor`` can be updated in place here: it holds values and is not an inference
    tensor outside ``torch.inference_mode()``."""
    if tensor.is_meta:
        raise ValueError(
            f"{name} is on the meta device and holds no values to update: materialize it "
            "first (module.to_empty(device=...), then load the weights)"
        )
    if tensor.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(
            f"{name} was created under torch.inference_mode() and cannot be updated in place "
            f"outside it: pass {name}.clone(), or call inside torch.inference_mode()"
        )
