"""Per-row-scaled weight formats: quantize a weight once into a
:class:`~lorasc_kernels.formats.scaled_weight.ScaledWeight`.

A scaled weight is ``codes`` (N, K) in a format of
:data:`lorasc_kernels.formats.registry.SCALED_WEIGHT_DTYPES` and ``scale`` (N,) float32, one per
output row: ``W = scale[row] · codes`` (:meth:`ScaledWeight.dequantize` gives ``W`` back).
Quantization uses per-row absmax scales (``max_j |W_ij| = max_value · scale_i``, up to
float32 rounding, and at least the format's ``min_scale``) and rounds to nearest; an
all-zero row gets scale 1. Merges keep the format with stochastic rounding and the rescale
rule of :func:`lorasc_kernels.formats.rounding.rescale_rows`.
"""

from __future__ import annotations

import torch

from .registry import ACTIVATION_FORMAT, WEIGHT_FORMATS, scaled_weight_dtype
from .rounding import round_to_scaled
from .scaled_weight import ScaledWeight

__all__ = ["format_dtype", "quantize", "quantize_rows", "row_scales"]


def format_dtype(weight_format: str) -> torch.dtype:
    """The storage dtype of ``weight_format``, a name of
    :data:`~lorasc_kernels.formats.registry.WEIGHT_FORMATS`."""
    if not isinstance(weight_format, str) or weight_format not in WEIGHT_FORMATS:
        raise ValueError(
            f"weight_format must be None or one of {sorted(WEIGHT_FORMATS)}, got {weight_format!r}"
        )
    return WEIGHT_FORMATS[weight_format]


@torch.no_grad()
def quantize(weight: torch.Tensor, dtype: torch.dtype) -> ScaledWeight:
    """A finite float ``weight`` (N, K) in the scaled format ``dtype``: ``scale`` (N,) from
    :func:`row_scales`, ``codes = round_nearest(W / scale)``.

    Rows are independent, so they are quantized in blocks of about
    :data:`QUANTIZE_BLOCK_ELEMENTS` elements: the float32 temporaries (~100 bytes per
    element) stay one block's size, and the result is the same bits as in one go. The
    values are checked finite with one host read at the end."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"weight must be a 2-D float tensor, got shape {tuple(weight.shape)} "
            f"and dtype {weight.dtype}"
        )
    rows, cols = weight.shape
    codes = torch.empty(rows, cols, dtype=dtype, device=weight.device)
    scale = torch.empty(rows, dtype=torch.float32, device=weight.device)
    finite = torch.ones((), dtype=torch.bool, device=weight.device)
    block = max(1, QUANTIZE_BLOCK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, block):
        values = weight[start : start + block].detach().to(torch.float32)
        finite &= torch.isfinite(values).all()
        scale[start : start + block] = block_scale = row_scales(values, dtype)
        codes[start : start + block] = round_to_scaled(
            values / block_scale[:, None], dtype, "nearest"
        )
    if not bool(finite):
        raise ValueError("weight has non-finite values: it cannot be quantized")
    return ScaledWeight(codes, scale)


# Elements quantized at a time by quantize (about 100 bytes of temporaries each: 100 MiB).
QUANTIZE_BLOCK_ELEMENTS = 1 << 20


def row_scales(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-row absmax scales (rows,) of float32 ``values`` (rows, cols), finite, for the scaled
    format ``dtype``: ``max_j |v_ij| / max_value``, one float32 ulp larger where float32
    rounding would put ``max |v / scale|`` above ``max_value``, and at least ``min_scale``
    (a row of tiny values keeps them down to ``min_scale`` times the smallest code, and its
    merges divide by a normal scale); 1 for an all-zero row."""
    entry = scaled_weight_dtype(dtype)
    peak = values.abs().amax(dim=1) if values.shape[1] else values.new_zeros(values.shape[0])
    scale = torch.where(peak > 0, (peak / entry.max_value).clamp(min=entry.min_scale), 1.0)
    return torch.where(
        peak / scale > entry.max_value, scale.nextafter(scale.new_full((), float("inf"))), scale
    )


def quantize_rows(values: torch.Tensor, dtype: torch.dtype | None = None) -> ScaledWeight:
    """float32 ``values`` (M, K) (activations, gradients) per row in the scaled format
    ``dtype`` (default :data:`~lorasc_kernels.formats.registry.ACTIVATION_FORMAT`): scales
    (M,) from :func:`row_scales`, codes ``round_nearest(values / scale)``. No value check and
    no host read (a call's inputs, not a weight quantized once)."""
    dtype = WEIGHT_FORMATS[ACTIVATION_FORMAT] if dtype is None else dtype
    scale = row_scales(values, dtype)
    return ScaledWeight(round_to_scaled(values / scale[:, None], dtype, "nearest"), scale)
