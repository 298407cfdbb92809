"""Checks of scaled (fp8) weights: their parts (:func:`check_scaled_pair`), their row
scales' values (:func:`scale_values_ok`, :func:`check_scale_values`), their rows' largest
values (:func:`scaled_row_max`) and the compute mode they allow (:func:`check_compute`);
each error names the argument and what was expected."""

from __future__ import annotations

import math

import torch

from .._checks import check_same_device, check_shape
from .registry import SCALED_DTYPES, dtype_names, scaled_weight_dtype

# The compute modes a scaled weight may run in besides its storage mode (None): "fp8"
# quantizes activations and gradients per row and multiplies on fp8 tensor cores (fp8.md).
COMPUTE_MODES = ("fp8",)


def check_compute(compute, weight_dtype: torch.dtype | None) -> str | None:
    """``compute`` is None or a name of :data:`COMPUTE_MODES`, and a compute mode has a
    scaled weight (``weight_dtype``: its format, or the float weight's dtype); returns it."""
    if compute is None:
        return None
    if not isinstance(compute, str) or compute not in COMPUTE_MODES:
        raise ValueError(f"compute must be None or one of {COMPUTE_MODES}, got {compute!r}")
    if weight_dtype not in SCALED_DTYPES:
        raise ValueError(
            f"compute={compute!r} multiplies fp8 codes: it needs a scaled weight "
            "(weight_format='fp8_e4m3' or 'fp8_e5m2'; ScaledWeight in the functional API), "
            f"got a {'float' if weight_dtype is None else weight_dtype} weight"
        )
    return compute


def check_scaled_pair(codes, scale) -> None:
    """``codes`` (N, K) in a scaled format and ``scale`` (N,) float32 on its device: the
    parts of a :class:`~lorasc_kernels.formats.scaled_weight.ScaledWeight`."""
    if not isinstance(codes, torch.Tensor) or codes.dtype not in SCALED_DTYPES:
        raise TypeError(
            f"ScaledWeight codes must be a tensor with a scaled dtype in "
            f"{dtype_names(SCALED_DTYPES)}, got {getattr(codes, 'dtype', type(codes).__name__)}"
            " (model.to(dtype) converts fp8 weights too: keep layers with weight_format set "
            "out of it)"
        )
    if codes.dim() != 2:
        raise ValueError(f"ScaledWeight codes must be 2-D, got shape {tuple(codes.shape)}")
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
        raise TypeError(
            f"ScaledWeight scale must be a float32 tensor, got "
            f"{getattr(scale, 'dtype', type(scale).__name__)}"
        )
    check_shape("ScaledWeight scale", scale, (codes.shape[0],), "one per row of codes")
    check_same_device(codes=codes, scale=scale)


def scale_values_ok(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Whether every row scale of ``scale`` (rows,) is finite, at least the ``min_scale`` of
    the scaled format ``dtype`` and at most float32's largest value over the format's (so
    every ``code · scale`` is finite): a 0-dim bool on ``scale``'s device, not read."""
    if scale.numel() == 0 or scale.is_meta:  # no values to check
        return torch.ones((), dtype=torch.bool, device=scale.device)
    fmt = scaled_weight_dtype(dtype)
    low, high = torch.aminmax(scale)
    return (low >= fmt.min_scale) & (high <= torch.finfo(torch.float32).max / fmt.max_value)


def raise_bad_scale(name: str, scale: torch.Tensor, dtype: torch.dtype) -> None:
    """Raise the ``ValueError`` of the first row scale :func:`scale_values_ok` refuses."""
    fmt = scaled_weight_dtype(dtype)
    smallest, largest = fmt.min_scale, torch.finfo(torch.float32).max / fmt.max_value
    bad = ~(torch.isfinite(scale) & (scale >= smallest) & (scale <= largest))
    row = int(bad.nonzero()[0, 0])
    raise ValueError(
        f"{name} must be positive and finite, at least "
        f"2**{math.log2(smallest):.0f} (the smallest scale of {dtype}) and at most "
        f"{largest:.4g} (beyond, the largest code times the scale overflows float32), got "
        f"{float(scale[row])} at row {row}"
    )


def check_scale_values(name: str, scale: torch.Tensor, dtype: torch.dtype) -> None:
    """:func:`scale_values_ok` read on the host (one read), raising by ``name`` if not."""
    if not bool(scale_values_ok(scale, dtype)):
        raise_bad_scale(name, scale, dtype)


# Rows reduced or merged exactly at a time (scratch memory of about 8 bytes per element).
ROW_BLOCK_ELEMENTS = 1 << 20


def scaled_row_max(
    weight: torch.Tensor, weight_scale: torch.Tensor, name: str = "weight_scale"
) -> torch.Tensor:
    """``max_j |weight_scale[i] · weight[i, j]|`` per row (float64), in blocks of rows;
    refuses (one read) scales that :func:`scale_values_ok` refuses, calling them ``name``."""
    check_scale_values(name, weight_scale, weight.dtype)
    return _scaled_row_max(weight, weight_scale)


def _scaled_row_max(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """:func:`scaled_row_max` without the check of the scales (nothing read)."""
    rows, cols = weight.shape
    if rows == 0 or cols == 0:
        return weight_scale.new_zeros(rows, dtype=torch.float64)
    block = max(1, ROW_BLOCK_ELEMENTS // cols)
    peak = torch.cat(
        [
            weight[start : start + block].to(torch.float32).abs().amax(dim=1)
            for start in range(0, rows, block)
        ]
    )
    return peak.double() * weight_scale.double()
