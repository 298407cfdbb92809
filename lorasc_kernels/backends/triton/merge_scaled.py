"""In-place merge into a scaled weight ``W = scale[row] · codes`` in Triton: codes and
scales updated together.

Scaled weights (:class:`~lorasc_kernels.formats.scaled_weight.ScaledWeight`: fp8 codes with one
float32 scale per row, ``docs/fp8.md``; the format's fields are constexprs):
``_merge_scaled_kernel`` reproduces :func:`lorasc_kernels.backends.reference.merge_scaled_`
bit for bit. A row may need a new scale (the rescale rule), which depends on the whole row,
so one program owns ``16`` whole rows and sweeps them twice: the first sweep finds each
row's largest ``|v / scale|`` without writing, the second recomputes the tile, rounds it on
integers (no fp8 instruction, so the interpreter runs the same code) and writes codes and
scales. The update ``v`` comes from :func:`.merge_update.updated`, as the float merge's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...formats.registry import float32_scalar
from ...formats.scaled_weight import ScaledWeight
from ..specs import MergeSpec
from . import interpreting
from .device import INTERPRETING, decode_scaled
from .fused_linear_scaled import format_fields
from .merge_update import noise_arguments, updated
from .random import element_bits, row_hash

__all__ = ["encode_scaled", "scaled_merge_tile", "merge_scaled"]


@triton.jit
def encode_scaled(
    value, random, STOCHASTIC: tl.constexpr, MANTISSA_BITS: tl.constexpr, MIN_FIELD: tl.constexpr
):
    """8-bit codes (uint8) of float32 ``value`` rounded into a scaled format, on integers:
    :func:`lorasc_kernels.formats.rounding.round_to_scaled` step for step (``MIN_FIELD``: float32
    exponent field of the format's smallest normal; ``random``: the uint32 rounding bits)."""
    DROP: tl.constexpr = 23 - MANTISSA_BITS
    pattern = value.to(tl.uint32, bitcast=True)
    field = tl.maximum((pattern >> 23) & 0xFF, 1)
    significand = (pattern & 0x7FFFFF) | tl.where(((pattern >> 23) & 0xFF) > 0, 0x800000, 0)
    shift = tl.minimum(tl.maximum(MIN_FIELD - field.to(tl.int32), 0), 31).to(tl.uint32)
    aligned = significand >> shift
    if STOCHASTIC:
        carry = random >> (32 - DROP)
    else:
        sticky = (significand & ((tl.full(shift.shape, 1, tl.uint32) << shift) - 1)) != 0
        aligned = aligned | sticky.to(tl.uint32)
        carry = ((1 << (DROP - 1)) - 1) + ((aligned >> DROP) & 1)
    steps = (aligned + carry) >> DROP
    code = (((tl.maximum(field, MIN_FIELD) - MIN_FIELD) << MANTISSA_BITS) + steps) | (
        (pattern >> 31) << 7
    )
    return code.to(tl.uint8)


@triton.jit
def _scaled_tile(
    code_ptr,
    scale,
    lora_b_ptr,
    lora_a_ptr,
    row_ids,
    col_ids,
    row_mask,
    col_mask,
    global_rows,
    rank,
    stride_w_row,
    stride_w_col,
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
    MANTISSA_BITS: tl.constexpr,
    EXPONENT_BIAS: tl.constexpr,
    HAS_INFINITY: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """``(y, code pointers, mask)`` of a tile: ``y = updated(scale · q) / scale`` in float32
    (IEEE division), as ``reference.merge_scaled_`` computes it."""
    mask = row_mask[:, None] & col_mask[None, :]
    ptrs = code_ptr + row_ids[:, None] * stride_w_row + col_ids[None, :] * stride_w_col
    value = scale[:, None] * decode_scaled(
        tl.load(ptrs, mask=mask, other=0), MANTISSA_BITS, EXPONENT_BIAS, HAS_INFINITY
    )
    value = updated(
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
        HAS_REMOVE,
        HAS_ADD,
        EXACT_PRODUCTS,
        INTERPRETING,
        BLOCK_ROWS,
        BLOCK_COLS,
    )
    return tl.math.div_rn(value, scale[:, None]), ptrs, mask


@triton.jit(do_not_specialize=["remove_key", "add_key", "rounding_key", "row_offset"])
def _merge_scaled_kernel(
    # codes (rows, cols) of a scaled W as uint8 and its scales (rows,), both updated in place
    code_ptr,
    scale_ptr,
    lora_b_ptr,
    lora_a_ptr,
    rows,
    cols,
    rank,
    stride_w_row,
    stride_w_col,
    stride_scale,
    stride_b_row,
    stride_b_rank,
    stride_a_rank,
    stride_a_col,
    coeff,
    remove_scale,
    add_scale,
    remove_key,
    add_key,
    rounding_key,
    row_offset,
    HAS_REMOVE: tl.constexpr,
    HAS_ADD: tl.constexpr,
    EXACT_PRODUCTS: tl.constexpr,
    INTERPRETING: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    # the format (dtypes.ScaledWeightDtype) and its largest value as float32 fields
    MANTISSA_BITS: tl.constexpr,
    EXPONENT_BIAS: tl.constexpr,
    HAS_INFINITY: tl.constexpr,
    MAX_VALUE: tl.constexpr,
    MAX_FIELD: tl.constexpr,
    MAX_FRACTION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """One program owns ``BLOCK_ROWS`` whole rows: a first sweep finds each row's
    ``max |y|`` (nothing written), then the rescale rule picks its scale, and a second sweep
    recomputes ``y`` and writes the rounded codes."""
    row_ids = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = row_ids < rows
    global_rows = row_offset + row_ids
    scale = tl.load(scale_ptr + row_ids * stride_scale, mask=row_mask, other=1.0)
    MIN_FIELD: tl.constexpr = 127 + 1 - EXPONENT_BIAS
    peak = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    down = tl.full((BLOCK_ROWS,), 1.0, tl.float32)
    for sweep in tl.static_range(2):
        if sweep == 1:  # rescale_rows: k = (e_peak − e_max) + (fraction_peak > fraction_max)
            peak_bits = peak.to(tl.uint32, bitcast=True)
            k = (
                ((peak_bits >> 23) & 0xFF).to(tl.int32)
                - MAX_FIELD
                + ((peak_bits & 0x7FFFFF) > MAX_FRACTION).to(tl.int32)
            )
            k = tl.where(peak > MAX_VALUE, k, 0)
            down = ((127 - k).to(tl.uint32) << 23).to(tl.float32, bitcast=True)
        for c0 in range(0, cols, BLOCK_COLS):
            col_ids = c0 + tl.arange(0, BLOCK_COLS).to(tl.int64)
            y, ptrs, mask = _scaled_tile(
                code_ptr,
                scale,
                lora_b_ptr,
                lora_a_ptr,
                row_ids,
                col_ids,
                row_mask,
                col_ids < cols,
                global_rows,
                rank,
                stride_w_row,
                stride_w_col,
                stride_b_row,
                stride_b_rank,
                stride_a_rank,
                stride_a_col,
                coeff,
                remove_scale,
                add_scale,
                remove_key,
                add_key,
                HAS_REMOVE,
                HAS_ADD,
                EXACT_PRODUCTS,
                INTERPRETING,
                MANTISSA_BITS,
                EXPONENT_BIAS,
                HAS_INFINITY,
                BLOCK_ROWS,
                BLOCK_COLS,
            )
            if sweep == 0:
                peak = tl.maximum(peak, tl.max(tl.where(mask, tl.abs(y), 0.0), axis=1))
            else:
                random = 0
                if STOCHASTIC:
                    random = element_bits(
                        row_hash(rounding_key, global_rows)[:, None], col_ids[None, :]
                    )
                tl.store(
                    ptrs,
                    encode_scaled(y * down[:, None], random, STOCHASTIC, MANTISSA_BITS, MIN_FIELD),
                    mask=mask,
                )
    tl.store(scale_ptr + row_ids * stride_scale, tl.math.div_rn(scale, down), mask=row_mask)


def scaled_merge_tile() -> tuple[int, int, int]:
    """``(BLOCK_ROWS, BLOCK_COLS, num_warps)`` of the scaled merge: whole rows per program."""
    return (8, 32, 1) if interpreting() else (16, 256, 8)


def merge_scaled(
    weight: ScaledWeight, lora_B, lora_A, spec: MergeSpec, exact_products: bool
) -> None:
    """The merge into a scaled ``W = scale[row] · codes``, codes and scales in place;
    ``exact_products``: the rank step rounds once (:func:`_rank_step`)."""
    rows, cols = weight.shape
    remove_key, remove_scale = noise_arguments(spec.remove)
    add_key, add_scale = noise_arguments(spec.add)
    max_value = weight.format.max_value
    max_bits = int(torch.tensor(max_value, dtype=torch.float32).view(torch.int32))
    block_rows, block_cols, num_warps = scaled_merge_tile()
    _merge_scaled_kernel[(triton.cdiv(rows, block_rows),)](
        weight.codes.view(torch.uint8),
        weight.scale,
        lora_B,
        lora_A,
        rows,
        cols,
        lora_A.shape[0],
        *weight.codes.stride(),
        weight.scale.stride(0),
        *lora_B.stride(),
        *lora_A.stride(),
        float32_scalar(spec.coeff),
        remove_scale,
        add_scale,
        remove_key,
        add_key,
        spec.rounding_key,
        spec.row_offset,
        HAS_REMOVE=spec.remove is not None,
        HAS_ADD=spec.add is not None,
        EXACT_PRODUCTS=exact_products,
        INTERPRETING=INTERPRETING,
        STOCHASTIC=spec.stochastic,
        **format_fields(weight),
        MAX_VALUE=max_value,
        MAX_FIELD=max_bits >> 23,
        MAX_FRACTION=max_bits & 0x7FFFFF,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        num_warps=num_warps,
        num_stages=1,
        enable_fp_fusion=False,
    )
