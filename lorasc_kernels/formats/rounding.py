"""float32 → weight-dtype rounding, round-to-nearest or stochastic, shared by all backends.

Stochastic rounding adds random bits below the target's last mantissa bit to the float32
bit pattern and truncates them (torchao's ``_fp32_to_bf16_sr`` trick): a value rounds
away from zero with probability equal to its distance from the lower neighbour, so the
expected result is the exact value. The random bits are the top bits of
``noise.hash_bits`` on :data:`~lorasc_kernels.noise.STREAM_ROUNDING`; how many bits a dtype
drops comes from its entry in :data:`lorasc_kernels.formats.registry.WEIGHT_DTYPES`:

* bfloat16: drop 16 bits, random ``bits >> 16``; exact over bf16's whole range.
* float16: drop 13 bits, random ``bits >> 19``; exact for |v| >= 2**-14 (fp16 normals).
  Below that, fp16 is subnormal and the final conversion rounds the truncated value to
  nearest, so tiny weights (|w| < 6.1e-5) round with a small bias. Values past fp16's
  range become ±inf, as with any fp16 conversion.
* float32 / float64: already exact at this precision; no rounding is applied.

Non-finite values pass through unchanged (no random bits are added to inf or NaN).

Scaled formats (fp8 e4m3 and e5m2, :data:`lorasc_kernels.formats.registry.SCALED_WEIGHT_DTYPES`)
round ``y = v / scale`` on integers (:func:`round_to_scaled`), the same way in every range
and for every format, from its registry entry: the float32 significand is aligned to the
format's step (``2**(e - mantissa_bits)`` for normals, ``2**(min_exponent -
mantissa_bits)`` below ``2**min_exponent``, its subnormals) with ``step_bits = 23 -
mantissa_bits`` bits below the step (20 for e4m3, 21 for e5m2), then stochastic rounding
adds the top ``step_bits`` of ``bits`` and truncates, and round-to-nearest adds half a step
(ties to even, a sticky bit keeps what the alignment shifted out). In the normal range
nothing is shifted out, so stochastic rounding is exactly unbiased; in the subnormal range
bits finer than ``2**-step_bits`` of a step are truncated first (a bias below that). A row
whose ``max |y|`` exceeds the format's largest value is rescaled first
(:func:`rescale_rows`); values are never clamped, so no code is ever inf or NaN.
"""

from __future__ import annotations

import torch

from .registry import scaled_weight_dtype, weight_dtype

__all__ = ["ROUNDING_MODES", "round_from_fp32", "round_to_scaled", "rescale_rows"]

ROUNDING_MODES = ("nearest", "stochastic")


def round_from_fp32(
    value: torch.Tensor, dtype: torch.dtype, rounding: str, bits: torch.Tensor | None = None
) -> torch.Tensor:
    """Round float32 ``value`` to ``dtype``.

    Args:
        value: float32 tensor.
        dtype: target dtype.
        rounding: ``"nearest"`` or ``"stochastic"``.
        bits: int64 tensor of uint32 random bits, same shape as ``value``; required for
            ``"stochastic"`` when ``dtype`` drops bits (fp16, bf16).
    """
    drop = weight_dtype(dtype).dropped_bits
    if rounding == "nearest" or drop == 0:
        return value.to(dtype)
    random = (bits >> (32 - drop)).to(torch.int32)
    pattern = value.view(torch.int32)
    truncated = (pattern + random) & ~((1 << drop) - 1)
    rounded = torch.where(torch.isfinite(value), truncated, pattern)
    return rounded.view(torch.float32).to(dtype)


_FLOAT32_BIAS = 127
_MANTISSA_MASK = (1 << 23) - 1


def _fields(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sign, exponent field, fraction)`` of float32 ``value``'s bits, as int64."""
    pattern = value.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return pattern >> 31, (pattern >> 23) & 0xFF, pattern & _MANTISSA_MASK


def round_to_scaled(
    value: torch.Tensor, dtype: torch.dtype, rounding: str, bits: torch.Tensor | None = None
) -> torch.Tensor:
    """Round float32 ``value`` (finite, ``|value| <= max_value``) into the scaled format
    ``dtype`` (module docstring); ``bits`` (int64 uint32 hash bits, ``value``'s shape) are
    required for ``"stochastic"``. Returns a tensor of ``dtype``.
    """
    entry = scaled_weight_dtype(dtype)
    sign, field, fraction = _fields(value)
    significand = fraction | torch.where(field > 0, 1 << 23, 0)
    min_field = _FLOAT32_BIAS + entry.min_exponent  # float32 field of the smallest normal
    field = field.clamp(min=1)  # float32 subnormals have the exponent of field 1
    shift = (min_field - field).clamp(0, 31)
    aligned = significand >> shift  # units of 2**-step_bits of a format step
    drop = entry.step_bits
    if rounding == "stochastic":
        carry = bits >> (32 - drop)
    else:
        aligned = aligned | ((significand & ((1 << shift) - 1)) != 0).to(torch.int64)
        carry = (1 << (drop - 1)) - 1 + ((aligned >> drop) & 1)
    steps = (aligned + carry) >> drop  # whole steps, up to 2**(mantissa_bits + 1)
    # The format's code: the exponent field above the smallest normal, plus the steps (a
    # carry of the steps into the exponent is what the encoding does by itself).
    code = (sign << 7) | (((field.clamp(min=min_field) - min_field) << entry.mantissa_bits) + steps)
    return code.to(torch.uint8).view(dtype)


def rescale_rows(
    value: torch.Tensor, scale: torch.Tensor, max_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(value · 2**-k, scale · 2**k)`` per row, with the smallest ``k >= 0`` that brings
    the row's ``max |value|`` within ``max_value``: the rescale rule of scaled formats.

    ``value`` (rows, cols) float32 and finite, ``scale`` (rows,) float32. Both products are
    exact (powers of two), so ``W = scale · value`` is unchanged. ``k`` comes from the
    exponent and fraction bits of the row's peak and of ``max_value``:
    ``k = (e_peak − e_max) + (fraction_peak > fraction_max)`` where the peak exceeds
    ``max_value``, else 0.
    """
    peak = value.abs().amax(dim=1) if value.shape[1] else scale.new_zeros(scale.shape)
    _, peak_field, peak_fraction = _fields(peak)
    _, max_field, max_fraction = _fields(torch.tensor(max_value, dtype=torch.float32))
    k = (peak_field - max_field) + (peak_fraction > max_fraction).to(torch.int64)
    k = torch.where(peak > max_value, k, 0).to(torch.float32)
    return value * torch.exp2(-k)[:, None], scale * torch.exp2(k)
