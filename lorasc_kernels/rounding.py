"""float32 → weight-dtype rounding, round-to-nearest or stochastic, shared by all backends.

Stochastic rounding adds random bits below the target's last mantissa bit to the float32
bit pattern and truncates them (torchao's ``_fp32_to_bf16_sr`` trick): a value rounds
away from zero with probability equal to its distance from the lower neighbour, so the
expected result is the exact value. The random bits are the top bits of
``noise.hash_bits`` on :data:`~lorasc_kernels.noise.STREAM_ROUNDING`; how many bits a dtype
drops comes from its entry in :data:`lorasc_kernels.dtypes.WEIGHT_DTYPES`:

* bfloat16: drop 16 bits, random ``bits >> 16``; exact over bf16's whole range.
* float16: drop 13 bits, random ``bits >> 19``; exact for |v| >= 2**-14 (fp16 normals).
  Below that, fp16 is subnormal and the final conversion rounds the truncated value to
  nearest, so tiny weights (|w| < 6.1e-5) round with a small bias. Values past fp16's
  range become ±inf, as with any fp16 conversion.
* float32 / float64: already exact at this precision; no rounding is applied.

Non-finite values pass through unchanged (no random bits are added to inf or NaN).
"""

from __future__ import annotations

import torch

from .dtypes import weight_dtype

__all__ = ["ROUNDING_MODES", "round_from_fp32"]

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
