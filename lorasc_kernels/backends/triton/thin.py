"""Thin products of the LoRA branch with dropout regenerated from its seed, in Triton.

Shapes: ``x`` (M, K), ``lora_A`` (r, K), ``grad_xa`` (M, r).

* :func:`dropout_lowrank` — ``xa = drop(x) Aᵀ`` (M, r) for the forward;
* :func:`dropout_lowrank_grad` — ``Gᵀ drop(x)`` (r, K) for backward's ``dA``.

Both regenerate the keep-mask of :func:`~lorasc_kernels.backends.reference.dropout_keep_mask`
from the seed for each ``x`` tile they load (one hash per element of ``x``) and never store
it. Without dropout the same products are plain ``torch.mm`` calls (cuBLAS), done by the
caller.

Also the device helpers that :mod:`.fused_linear` shares: :func:`round_to`, :func:`mma`,
:func:`dropout_tile`, and the host-side :func:`dot_precision`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import noise as noise_lib
from ..reference import dropout_threshold
from . import interpreting
from .configs import thin_configs
from .random import element_bits, row_hash

__all__ = [
    "dropout_params",
    "rank_block",
    "dot_precision",
    "round_to",
    "mma",
    "dropout_tile",
    "dropout_lowrank",
    "dropout_lowrank_grad",
]

# Rows of x reduced by one program of dropout_lowrank_grad: a multiple of every BLOCK_M.
_GRAD_ROWS_PER_SPLIT = 256
# At most this many fp32 partials of dA (r × K each) are summed after the kernel.
_GRAD_MAX_SPLITS = 16


def dropout_params(seed: int, p: float) -> tuple[int, int, float]:
    """``(key, threshold, keep_scale)`` of the dropout mask that kernels regenerate."""
    key = noise_lib.stream_key(seed, noise_lib.STREAM_DROPOUT)
    return key, dropout_threshold(p), 1.0 / (1.0 - p)


def rank_block(r: int) -> int:
    """Columns of the rank dimension per block: ``r`` padded to a power of two in [16, 64]."""
    return min(64, max(16, triton.next_power_of_2(r)))


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
    threshold``, the rule of ``reference.dropout_keep_mask``.
    """
    bits = element_bits(row_hash(key, rows)[:, None], cols[None, :])
    kept = tl.where((bits >> 8) >= threshold, tile.to(tl.float32) * keep_scale, 0.0)
    return round_to(kept, tile.dtype, INTERPRETING)


@triton.autotune(configs=thin_configs(), key=["M_BUCKET", "K", "R"])
@triton.jit(do_not_specialize=["key", "threshold"])
def _dropout_lowrank_kernel(
    xa_ptr, x_ptr, a_ptr,  # xa (M, R) = drop(x) (M, K) @ A (R, K)ᵀ
    M, K, R,
    M_BUCKET,  # autotuning key: M rounded up to a power of two
    stride_xam, stride_xar, stride_xm, stride_xk, stride_ar, stride_ak,
    key, threshold, keep_scale,  # dropout mask
    R_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program: ``BLOCK_M`` rows × ``R_BLOCK`` rank columns of ``xa``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * R_BLOCK + tl.arange(0, R_BLOCK)
    rows = offs_m.to(tl.int64)
    ranks = offs_r.to(tl.int64)
    acc = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        cols = offs_k.to(tl.int64)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        x = dropout_tile(x, offs_m, offs_k, key, threshold, keep_scale, INTERPRETING)
        a_t = tl.load(a_ptr + ranks[None, :] * stride_ar + cols[:, None] * stride_ak,
                      mask=(offs_r[None, :] < R) & (offs_k[:, None] < K), other=0.0)
        acc = mma(x, a_t, acc, DOT_PRECISION, INTERPRETING)
    tl.store(xa_ptr + rows[:, None] * stride_xam + ranks[None, :] * stride_xar,
             round_to(acc, xa_ptr.dtype.element_ty, INTERPRETING),
             mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


@triton.autotune(configs=thin_configs(), key=["M_BUCKET", "K", "R"])
@triton.jit(do_not_specialize=["key", "threshold"])
def _dropout_lowrank_grad_kernel(
    part_ptr, g_ptr, x_ptr,  # part[s] (R, K) = G[rows of split s]ᵀ @ drop(x)[rows of split s]
    M, K, R, ROWS_PER_SPLIT,
    M_BUCKET,  # autotuning key: M rounded up to a power of two
    stride_ps, stride_pr, stride_pk, stride_gm, stride_gr, stride_xm, stride_xk,
    key, threshold, keep_scale,  # dropout mask
    R_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program: columns ``[pid_k·BLOCK_K, +BLOCK_K)`` × one rank block × one row split."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.program_id(1) * R_BLOCK + tl.arange(0, R_BLOCK)
    split = tl.program_id(2)
    cols = offs_k.to(tl.int64)
    ranks = offs_r.to(tl.int64)
    acc = tl.zeros((R_BLOCK, BLOCK_K), dtype=tl.float32)
    row_start = split * ROWS_PER_SPLIT
    for m0 in range(row_start, tl.minimum(row_start + ROWS_PER_SPLIT, M), BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows = offs_m.to(tl.int64)
        g_t = tl.load(g_ptr + rows[None, :] * stride_gm + ranks[:, None] * stride_gr,
                      mask=(offs_m[None, :] < M) & (offs_r[:, None] < R), other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        x = dropout_tile(x, offs_m, offs_k, key, threshold, keep_scale, INTERPRETING)
        acc = mma(g_t, x, acc, DOT_PRECISION, INTERPRETING)
    tl.store(part_ptr + split * stride_ps + ranks[:, None] * stride_pr + cols[None, :] * stride_pk,
             acc, mask=(offs_r[:, None] < R) & (offs_k[None, :] < K))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for ``dtype`` operands, following torch's fp32 matmul
    precision (``torch.set_float32_matmul_precision``): at ``"highest"`` (torch's default)
    fp32 dots run as 3×tf32 ("tf32x3": error ~1e-6, on tensor cores, whereas Triton's
    IEEE fp32 dot runs on CUDA cores and spills registers at 128×128 tiles), else tf32.
    16-bit operands ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "tf32x3"
    return "tf32"


def dropout_lowrank(x: torch.Tensor, lora_A: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """``drop(x) Aᵀ`` (M, r) in ``x``'s dtype; ``x`` (M, K) any strides, ``lora_A`` (r, K)."""
    (M, K), r = x.shape, lora_A.shape[0]
    xa = torch.empty(M, r, device=x.device, dtype=x.dtype)
    key, threshold, keep_scale = dropout_params(seed, p)
    r_block = rank_block(r)

    def grid(meta):
        return triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(r, r_block)

    _dropout_lowrank_kernel[grid](
        xa, x, lora_A, M, K, r, triton.next_power_of_2(M),
        xa.stride(0), xa.stride(1), x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1),
        key, threshold, keep_scale,
        R_BLOCK=r_block, DOT_PRECISION=dot_precision(x.dtype),
        INTERPRETING=interpreting(),
    )
    return xa


def dropout_lowrank_grad(grad_xa: torch.Tensor, x: torch.Tensor, seed: int, p: float
                         ) -> torch.Tensor:
    """``Gᵀ drop(x)`` (r, K) in float32 for ``G = grad_xa`` (M, r) and ``x`` (M, K).

    The reduction over M is split in up to 16 row ranges whose fp32 partials are summed
    here, so that enough programs run when ``K`` is small; the order is fixed, so the
    result is deterministic.
    """
    (M, K), r = x.shape, grad_xa.shape[1]
    rows_per_split = max(_GRAD_ROWS_PER_SPLIT,
                         triton.cdiv(triton.cdiv(M, _GRAD_MAX_SPLITS), _GRAD_ROWS_PER_SPLIT)
                         * _GRAD_ROWS_PER_SPLIT)
    splits = triton.cdiv(M, rows_per_split)
    partials = torch.empty(splits, r, K, device=x.device, dtype=torch.float32)
    key, threshold, keep_scale = dropout_params(seed, p)
    r_block = rank_block(r)

    def grid(meta):
        return triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(r, r_block), splits

    _dropout_lowrank_grad_kernel[grid](
        partials, grad_xa, x, M, K, r, rows_per_split, triton.next_power_of_2(M),
        partials.stride(0), partials.stride(1), partials.stride(2),
        grad_xa.stride(0), grad_xa.stride(1), x.stride(0), x.stride(1),
        key, threshold, keep_scale,
        R_BLOCK=r_block, DOT_PRECISION=dot_precision(x.dtype),
        INTERPRETING=interpreting(),
    )
    return partials.sum(0)
