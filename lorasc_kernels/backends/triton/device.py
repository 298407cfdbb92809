"""Device functions shared by the Triton kernels: rounding to a storage dtype, the fp32
dot product, and the dropout mask on a tile. The counter-based hash is in :mod:`.random`.
"""

import triton
import triton.language as tl

from .random import element_bits, row_hash


@triton.jit
def round_to(value, dtype: tl.constexpr, INTERPRETING: tl.constexpr):
    """``value`` (fp32) rounded to nearest-even in ``dtype``.

    The interpreter truncates fp32 → bf16, so there the rounding is done on the bits.
    """
    if INTERPRETING and dtype == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return value.to(dtype)


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, INTERPRETING: tl.constexpr):
    """``acc + a @ b`` in fp32; operands are upcast in the interpreter (its bf16 dot
    multiplies raw bits)."""
    if INTERPRETING:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def dropout_tile(tile, rows, cols, key, threshold, keep_scale, INTERPRETING: tl.constexpr):
    """``drop(tile)`` in the tile's dtype: kept entries times ``keep_scale``, others 0.

    ``rows``/``cols`` are the tile's global indices in ``x``; keep iff ``bits >> 8 >=
    threshold``, the rule of ``reference.dropout_keep_mask``; ``key``, ``threshold`` and
    ``keep_scale`` are those of a :class:`~lorasc_kernels.specs.DropoutSpec`.
    """
    bits = element_bits(row_hash(key, rows)[:, None], cols[None, :])
    kept = tl.where((bits >> 8) >= threshold, tile.to(tl.float32) * keep_scale, 0.0)
    return round_to(kept, tile.dtype, INTERPRETING)


@triton.jit
def decode_scaled(code, MANTISSA_BITS: tl.constexpr, EXPONENT_BIAS: tl.constexpr):
    """float32 value of the 8-bit codes ``code`` (uint8) of a scaled format (fp8 e4m3fn),
    exactly, on integers: normals by their bits, subnormals as ``m · 2**(1 - bias - mb)``,
    the all-ones code as NaN. Needs no fp8 support (the interpreter has none)."""
    code = code.to(tl.uint32)
    magnitude = code & 0x7F
    exponent = magnitude >> MANTISSA_BITS
    fraction = magnitude & ((1 << MANTISSA_BITS) - 1)
    normal = ((code >> 7) << 31) | ((exponent + (127 - EXPONENT_BIAS)) << 23) \
        | (fraction << (23 - MANTISSA_BITS))
    subnormal_unit: tl.constexpr = 2.0 ** (1 - EXPONENT_BIAS - MANTISSA_BITS)
    subnormal = fraction.to(tl.float32) * subnormal_unit
    subnormal = tl.where((code >> 7) != 0, -subnormal, subnormal)
    value = tl.where(exponent == 0, subnormal, normal.to(tl.float32, bitcast=True))
    return tl.where(magnitude == 0x7F, float("nan"), value)
