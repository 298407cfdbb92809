"""Device functions shared by the Triton kernels: rounding to a storage dtype, the noise of
a weight tile, the fp32 dot product, the dropout mask on a tile, and the fused GEMMs' tile
order and rank term. The counter-based hash is in :mod:`.random`. :data:`INTERPRETING`: the
kernels' constexpr of that name, as their launchers pass it.
"""

import triton
import triton.language as tl

from . import interpreting
from .random import element_bits, row_hash, uniform_centered

# Whether the kernels were decorated for the interpreter: Triton decides it when a kernel
# module is imported (with this one), so it is read once here, not at every launch.
INTERPRETING = interpreting()


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
def add_noise_tile(
    q_t, offs_k, offs_n, key, noise_scale, W_TRANSPOSED: tl.constexpr, INTERPRETING: tl.constexpr
):
    """``round(q_t + noise_scale · noise(W row, W col))`` for a [BLOCK_K, BLOCK_N] tile of ``Qᵀ``.

    ``offs_k``/``offs_n`` are the tile's global indices in ``Q`` (N, K). ``Q = W``: W row
    ``offs_n``, col ``offs_k``; ``Q = Wᵀ`` (``W_TRANSPOSED``): W row ``offs_k``, col ``offs_n``.
    """
    if W_TRANSPOSED:
        bits = element_bits(row_hash(key, offs_k)[:, None], offs_n[None, :])
    else:
        bits = element_bits(row_hash(key, offs_n)[None, :], offs_k[:, None])
    noisy = q_t.to(tl.float32) + noise_scale * uniform_centered(bits)
    return round_to(noisy, q_t.dtype, INTERPRETING)


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
    ``keep_scale`` are those of a :class:`~lorasc_kernels.backends.specs.DropoutSpec`.
    """
    bits = element_bits(row_hash(key, rows)[:, None], cols[None, :])
    kept = tl.where((bits >> 8) >= threshold, tile.to(tl.float32) * keep_scale, 0.0)
    return round_to(kept, tile.dtype, INTERPRETING)


@triton.jit
def decode_scaled(
    code, MANTISSA_BITS: tl.constexpr, EXPONENT_BIAS: tl.constexpr, HAS_INFINITY: tl.constexpr
):
    """float32 value of the 8-bit codes ``code`` (uint8) of a scaled format
    (:class:`~lorasc_kernels.formats.registry.ScaledWeightDtype`'s fields), exactly, on integers:
    normals by their bits, subnormals as ``m · 2**(1 - bias - mb)``; with ``HAS_INFINITY``
    the all-ones exponent field as float32's (±inf, NaN), else the all-ones magnitude as NaN.
    Needs no fp8 support (the interpreter has none)."""
    code = code.to(tl.uint32)
    magnitude = code & 0x7F
    exponent = magnitude >> MANTISSA_BITS
    fraction = magnitude & ((1 << MANTISSA_BITS) - 1)
    TOP: tl.constexpr = 0x7F >> MANTISSA_BITS  # the all-ones exponent field
    field = exponent + (127 - EXPONENT_BIAS)
    if HAS_INFINITY:
        field = tl.where(exponent == TOP, 0xFF, field)
    normal = ((code >> 7) << 31) | (field << 23) | (fraction << (23 - MANTISSA_BITS))
    subnormal_unit: tl.constexpr = 2.0 ** (1 - EXPONENT_BIAS - MANTISSA_BITS)
    subnormal = fraction.to(tl.float32) * subnormal_unit
    subnormal = tl.where((code >> 7) != 0, -subnormal, subnormal)
    value = tl.where(exponent == 0, subnormal, normal.to(tl.float32, bitcast=True))
    if HAS_INFINITY:
        return value
    return tl.where(magnitude == 0x7F, float("nan"), value)


@triton.jit
def grouped_tile(
    tile_id, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr
):
    """``(tile row, tile column)`` of output tile ``tile_id``, row tiles grouped by
    ``GROUP_M`` so that consecutive tiles share the same ``Q`` tiles (L2 reuse)."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * tiles_n
    first_m = (tile_id // tiles_per_group) * GROUP_M
    group_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return (first_m + (tile_id % tiles_per_group) % group_m, (tile_id % tiles_per_group) // group_m)


@triton.jit
def rank_term(
    u_ptr,
    v_ptr,
    offs_m,
    offs_n,
    M,
    N,
    R,
    stride_um,
    stride_ur,
    stride_vn,
    stride_vr,
    scale,
    dropout_key,
    dropout_threshold,
    keep_scale,
    LORA_DROPOUT: tl.constexpr,
    R_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRETING: tl.constexpr,
):
    """``scale · drop(U Vᵀ)`` on the output tile ``offs_m × offs_n``, fp32: ``U`` (M, R),
    ``V`` (N, R), the rank dimension in blocks of ``R_BLOCK`` (masked); ``drop`` is
    :func:`dropout_tile` at the tile's ``(m, n)`` when ``LORA_DROPOUT``."""
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    acc = tl.zeros((offs_m.shape[0], offs_n.shape[0]), dtype=tl.float32)
    for r0 in tl.range(0, R, R_BLOCK, num_stages=1):  # one pass, no multi-buffering
        offs_r = r0 + tl.arange(0, R_BLOCK)
        ranks = offs_r.to(tl.int64)
        u = tl.load(
            u_ptr + rows[:, None] * stride_um + ranks[None, :] * stride_ur,
            mask=(offs_m[:, None] < M) & (offs_r[None, :] < R),
            other=0.0,
        )
        v_t = tl.load(
            v_ptr + cols[None, :] * stride_vn + ranks[:, None] * stride_vr,
            mask=(offs_n[None, :] < N) & (offs_r[:, None] < R),
            other=0.0,
        )
        acc = mma(u, v_t, acc, DOT_PRECISION, INTERPRETING)
    if LORA_DROPOUT:
        acc = dropout_tile(
            acc, offs_m, offs_n, dropout_key, dropout_threshold, keep_scale, INTERPRETING
        )
    return acc * scale
