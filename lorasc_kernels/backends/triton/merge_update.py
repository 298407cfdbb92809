"""The update of a merge tile, shared by the float and the scaled merge kernels:
``v = value − s_remove·u_remove + coeff · Σ_k B[:, k] A[k, :] + s_add·u_add`` in float32, in
the reference's order (``reference._merged_rows``), and the noise arguments the launchers
pass. :mod:`.merge` says why the rank loop is written as it is.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..specs import NoiseSpec
from .random import element_bits, row_hash, uniform_centered

__all__ = ["updated", "noise_arguments"]


@triton.jit
def _noise(key, global_rows, cols):
    """``noise.noise`` of a tile: uniform in [-0.5, 0.5), float32 (len(rows), len(cols))."""
    return uniform_centered(element_bits(row_hash(key, global_rows)[:, None], cols[None, :]))


@triton.jit
def _rank_step(delta, b, a, EXACT_PRODUCTS: tl.constexpr, INTERPRETING: tl.constexpr):
    """``delta + b · a`` (float32), as ``reference.lowrank_delta_fp32``: rounded once when
    the factors were 16-bit (their product is exact: an FMA; the interpreter's FMA rounds
    twice, so there the sum of the exact float64 product is rounded to float64 then to
    float32, which rounds once: 53 >= 2·24 + 2 bits), else product and sum each."""
    if EXACT_PRODUCTS:
        if INTERPRETING:
            exact = b.to(tl.float64) * a.to(tl.float64)
            return (delta.to(tl.float64) + exact).to(tl.float32)
        return tl.fma(b, a, delta)
    return delta + b * a


@triton.jit
def updated(
    value,
    lora_b_ptr,
    lora_a_ptr,
    row_ids,
    col_ids,
    row_mask,
    col_mask,
    global_rows,
    rank,
    stride_b_row,
    stride_b_rank,
    stride_a_rank,
    stride_a_col,
    coeff,
    remove_scale,
    add_scale,
    remove_key,
    add_key,
    HAS_REMOVE: tl.constexpr,
    HAS_ADD: tl.constexpr,
    EXACT_PRODUCTS: tl.constexpr,
    INTERPRETING: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """``value − s_remove·u_remove + coeff · Σ_k B[:, k] A[k, :] + s_add·u_add`` of a tile,
    float32, in the reference's order (``reference._merged_rows``)."""
    if HAS_REMOVE:
        value = value - remove_scale * _noise(remove_key, global_rows, col_ids)
    # Zeros (1 where W is NaN, whose result is NaN anyway) computed from the W tile, not a
    # constant: the rank loop then gets the tile's layout, each thread holding rows × 8
    # contiguous columns (a constant's default layout loads one B value per element).
    delta = (value != value).to(tl.float32)
    # Rows past the edge read row 0 (an unmasked load: no predicate, no fill in the loop);
    # their results are never stored. A's columns stay masked: its loads are vectors.
    b_ptrs = lora_b_ptr + tl.where(row_mask, row_ids, 0)[:, None] * stride_b_row
    a_ptrs = lora_a_ptr + col_ids[None, :] * stride_a_col
    for k in range(rank):  # B and A come in float32 (widened by the launcher)
        b = tl.load(b_ptrs + k * stride_b_rank)
        a = tl.load(a_ptrs + k * stride_a_rank, mask=col_mask[None, :], other=0.0)
        delta = _rank_step(delta, b, a, EXACT_PRODUCTS, INTERPRETING)
    value = value + coeff * delta
    if HAS_ADD:
        value = value + add_scale * _noise(add_key, global_rows, col_ids)
    return value


def noise_arguments(noise: NoiseSpec | None) -> tuple[int, float]:
    """``(key, float32 scale)`` of the kernel; ``(0, 0.0)`` when there is no noise."""
    return (0, 0.0) if noise is None else (noise.key, noise.scale32)
