"""In-place cascade merge ``W ← round(W − N_remove + coeff · B A + N_add)`` in Triton.

Shapes: ``weight`` (rows, cols), any strides without overlap, in a dtype of
:data:`lorasc_kernels.formats.registry.KERNEL_DTYPES`, updated in place; ``lora_B`` (rows, r) and
``lora_A`` (r, cols) in those dtypes too, any strides.

One program owns a ``BLOCK_ROWS × BLOCK_COLS`` tile of ``W``: it reads the tile once,
builds the tile of ``B A`` in registers, swaps the noise, rounds, and writes the tile back
to the same addresses. Nothing of ``W``'s size is allocated.

Exactness. Per element the kernel runs the float32 sequence of
:func:`lorasc_kernels.backends.reference.merge_`: ``delta = 0``, then for
``k = 0 … r-1`` ``delta = delta + B[i, k] * A[k, j]``, then
``v = W − s_remove·u_remove``, ``v = v + coeff·delta``, ``v = v + s_add·u_add``, then the
rounding of :mod:`lorasc_kernels.formats.rounding` with the same hash bits. The rank step is a
separate multiply and add, except when ``A`` and ``B`` share a 16-bit dtype: their products
are then exact and the step rounds once, an explicit ``tl.fma`` (``EXACT_PRODUCTS``;
:func:`lorasc_kernels.backends.reference.lowrank_delta_fp32` says why the reference agrees).
The launch passes ``enable_fp_fusion=False`` (ptxas ``--fmad=false``), so no other
multiply-add is contracted on the GPU; every other step is exact (noise, integer rounding,
widening of 16-bit inputs). The result is therefore bit-identical to the reference on the
GPU as under ``TRITON_INTERPRET=1`` (tested there; the compile gate finds no other ``fma``
in its PTX), for every finite value. Only NaN payloads may differ (a NaN stays a NaN).
Round-to-nearest to bf16 is done on the bits (``+ 0x7FFF + lsb``, as torch does) because
the interpreter's fp32 → bf16 cast truncates; bf16 loads are widened by shifting their bits
(fp16 by a plain cast), as the interpreter gets bf16 subnormals wrong.

Speed. The rank loop is exact float32 ALU work (no tensor cores: ``tl.dot`` would sum in
another order and break equality with the reference). Compiled for sm_90 it takes 2.1
instructions per element per rank with 16-bit factors (one FFMA, loads amortized over a
thread's 4 × 8 elements) and 3.1 with float32 factors (a multiply and an add): the
factors come in float32 (widened once by the launcher), and ``delta`` starts from the
loaded ``W`` tile so that the loop takes its layout (``docs/kernels.md``). A bf16 ``W``
moves 4 bytes per element; an H100 SXM (~3.35 TB/s, ~33 T instructions/s) thus affords
~40 instructions per element at full bandwidth: r = 16 (~34) plus the rounding (~12) sits
near it; a noise swap (~15 each) or r ≥ 32 makes the kernel compute-bound. Exactness was
chosen over speed: the merge runs once per cascade, and a dot-based merge could not match
the reference.

Tiling. One fixed tile, not autotuned: autotuning an in-place kernel must run it several
times on ``W`` and restore ``W`` from a copy, a temporary of ``W``'s size that a merge must
never allocate. 64 × 128 elements per program with 8 warps (32 elements per thread) keeps
every SM busy on the weight sizes of real models; under the interpreter a small tile.

Scaled weights (fp8 codes with per-row scales) merge in :mod:`.merge_scaled`; the update
``v`` of a tile, shared, is :mod:`.merge_update`'s.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...formats.registry import float32_scalar, weight_dtype
from ...formats.scaled_weight import ScaledWeight
from .. import reference
from ..specs import MergeSpec
from . import interpreting, on_tensor_device
from .device import INTERPRETING
from .merge_scaled import merge_scaled
from .merge_update import noise_arguments, updated
from .random import element_bits, row_hash

__all__ = ["merge_tile", "merge_"]


def merge_tile() -> tuple[int, int, int]:
    """``(BLOCK_ROWS, BLOCK_COLS, num_warps)`` of the merge kernel."""
    return (32, 64, 1) if interpreting() else (64, 128, 8)


@triton.jit
def _load_fp32(pointers, mask):
    """Load and widen to float32; bf16 is widened by its bits (exact, subnormals included)."""
    value = tl.load(pointers, mask=mask, other=0.0)
    if value.dtype == tl.bfloat16:
        bits = value.to(tl.uint16, bitcast=True).to(tl.uint32)
        return (bits << 16).to(tl.float32, bitcast=True)
    return value.to(tl.float32)


@triton.jit
def _drop_low_bits(value, random, DROP_BITS: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Round float32 ``value`` to ``23 - DROP_BITS`` mantissa bits on its bit pattern.

    Stochastic: add the top ``DROP_BITS`` of ``random`` (uint32) and truncate, as
    :func:`lorasc_kernels.formats.rounding.round_from_fp32`. Nearest: add ``0x7F..F + lsb`` (ties to
    even), exact for bf16 only (same exponent range as float32). inf and NaN pass unchanged.
    """
    pattern = value.to(tl.uint32, bitcast=True)
    if STOCHASTIC:
        bias = random >> (32 - DROP_BITS)
    else:
        bias = ((1 << (DROP_BITS - 1)) - 1) + ((pattern >> DROP_BITS) & 1)
    rounded = ((pattern + bias) >> DROP_BITS) << DROP_BITS
    finite = (pattern & 0x7F800000) != 0x7F800000
    return tl.where(finite, rounded.to(tl.float32, bitcast=True), value)


@triton.jit(do_not_specialize=["remove_key", "add_key", "rounding_key", "row_offset"])
def _merge_kernel(
    # W (rows, cols), read and written in place; B (rows, rank); A (rank, cols)
    weight_ptr,
    lora_b_ptr,
    lora_a_ptr,
    rows,
    cols,
    rank,
    # strides, in elements
    stride_w_row,
    stride_w_col,
    stride_b_row,
    stride_b_rank,
    stride_a_rank,
    stride_a_col,
    # float32 scalars: multiplier of B A and the two noise scales
    coeff,
    remove_scale,
    add_scale,
    # 32-bit hash keys (noise.stream_key) and the global index of W's first row
    remove_key,
    add_key,
    rounding_key,
    row_offset,
    HAS_REMOVE: tl.constexpr,
    HAS_ADD: tl.constexpr,
    EXACT_PRODUCTS: tl.constexpr,
    INTERPRETING: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    DROP_BITS: tl.constexpr,
    NEAREST_ON_BITS: tl.constexpr,  # of W's dtype (formats/registry.py)
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    row_ids = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col_ids = tl.program_id(1).to(tl.int64) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    row_mask = row_ids < rows
    col_mask = col_ids < cols
    mask = row_mask[:, None] & col_mask[None, :]
    global_rows = row_offset + row_ids
    w_ptrs = weight_ptr + row_ids[:, None] * stride_w_row + col_ids[None, :] * stride_w_col

    value = updated(
        _load_fp32(w_ptrs, mask),
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
    if DROP_BITS > 0:
        if STOCHASTIC:
            random = element_bits(row_hash(rounding_key, global_rows)[:, None], col_ids[None, :])
            value = _drop_low_bits(value, random, DROP_BITS, STOCHASTIC)
        elif NEAREST_ON_BITS:  # else the cast below rounds to nearest-even, subnormals included
            value = _drop_low_bits(value, 0, DROP_BITS, STOCHASTIC)
    tl.store(w_ptrs, value.to(weight_ptr.dtype.element_ty), mask=mask)


@on_tensor_device
def merge_(weight, lora_B, lora_A, spec: MergeSpec) -> None:
    """In-place merge on validated arguments; same bits as the reference (module docstring).

    ``weight`` (rows, cols), or a :class:`ScaledWeight`'s codes and scales, may have any
    strides but no overlapping elements (refused by
    :func:`lorasc_kernels.merge.merge_lowrank_`). A :class:`ScaledWeight` takes the
    scaled merge (whole rows per program, module docstring).
    """
    # The factors in float32 (exact), once: the rank loop then loads them without widening.
    exact_products = reference.exact_products(lora_B.dtype, lora_A.dtype)
    lora_B, lora_A = lora_B.float(), lora_A.float()
    if isinstance(weight, ScaledWeight):
        merge_scaled(weight, lora_B, lora_A, spec, exact_products)
        return
    rows, cols = weight.shape
    remove_key, remove_scale = noise_arguments(spec.remove)
    add_key, add_scale = noise_arguments(spec.add)
    rounding = weight_dtype(weight.dtype)

    block_rows, block_cols, num_warps = merge_tile()
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(cols, block_cols))
    _merge_kernel[grid](
        weight,
        lora_B,
        lora_A,
        rows,
        cols,
        lora_A.shape[0],
        *weight.stride(),
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
        DROP_BITS=rounding.dropped_bits,
        NEAREST_ON_BITS=rounding.nearest_on_bits,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        num_warps=num_warps,
        num_stages=1,
        enable_fp_fusion=False,
    )
