"""Thin products of the LoRA branch with dropout regenerated from its seed, in Triton.

Shapes: ``x`` (M, K), ``lora_A`` (r, K), ``grad`` (M, r).

* :func:`dropout_lowrank` — ``xa = drop(x) Aᵀ`` (M, r) for the forward;
* :func:`dropout_lowrank_grad` — ``s · Gᵀ drop(x)`` (r, K) for backward's ``dA``.

Both regenerate the keep-mask of :func:`~lorasc_kernels.backends.reference.dropout_keep_mask`
from the seed for each ``x`` tile they load (one hash per element of ``x``) and never store
it. Without dropout the same products are plain ``torch.mm`` calls (cuBLAS), done by
:mod:`lorasc_kernels.backends.composition`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...formats.registry import float32_scalar
from ..specs import DropoutSpec
from . import on_tensor_device
from .configs import dot_precision, m_bucket, rank_block, thin_configs
from .device import INTERPRETING, dropout_tile, mma, round_to
from .fused_linear import dropout_arguments
from .launch import launch

__all__ = ["dropout_lowrank", "dropout_lowrank_grad"]

# Rows of x reduced by one program of dropout_lowrank_grad: a multiple of every BLOCK_M.
_GRAD_ROWS_PER_SPLIT = 256
# At most this many fp32 partials of dA (r × K each) are summed after the kernel.
_GRAD_MAX_SPLITS = 16


@triton.autotune(configs=thin_configs(), key=["M_BUCKET", "K", "R"])
@triton.jit(do_not_specialize=["key", "threshold"])
def _dropout_lowrank_kernel(
    xa_ptr,
    x_ptr,
    a_ptr,  # xa (M, R) = drop(x) (M, K) @ A (R, K)ᵀ
    M,
    K,
    R,
    M_BUCKET,  # autotuning key: M rounded up to a power of two
    stride_xam,
    stride_xar,
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    key,
    threshold,
    keep_scale,  # dropout mask
    R_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRETING: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
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
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
            other=0.0,
        )
        x = dropout_tile(x, offs_m, offs_k, key, threshold, keep_scale, INTERPRETING)
        a_t = tl.load(
            a_ptr + ranks[None, :] * stride_ar + cols[:, None] * stride_ak,
            mask=(offs_r[None, :] < R) & (offs_k[:, None] < K),
            other=0.0,
        )
        acc = mma(x, a_t, acc, DOT_PRECISION, INTERPRETING)
    tl.store(
        xa_ptr + rows[:, None] * stride_xam + ranks[None, :] * stride_xar,
        round_to(acc, xa_ptr.dtype.element_ty, INTERPRETING),
        mask=(offs_m[:, None] < M) & (offs_r[None, :] < R),
    )


@triton.autotune(configs=thin_configs(), key=["M_BUCKET", "K", "R"])
@triton.jit(do_not_specialize=["key", "threshold"])
def _dropout_lowrank_grad_kernel(
    part_ptr,
    g_ptr,
    x_ptr,  # part[s] (R, K) = scale · G[rows of split s]ᵀ @ drop(x)[rows of split s]
    M,
    K,
    R,
    ROWS_PER_SPLIT,
    M_BUCKET,  # autotuning key: M rounded up to a power of two
    stride_ps,
    stride_pr,
    stride_pk,
    stride_gm,
    stride_gr,
    stride_xm,
    stride_xk,
    scale,  # of the product, applied to the float32 partial
    key,
    threshold,
    keep_scale,  # dropout mask
    R_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRETING: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
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
        g_t = tl.load(
            g_ptr + rows[None, :] * stride_gm + ranks[:, None] * stride_gr,
            mask=(offs_m[None, :] < M) & (offs_r[:, None] < R),
            other=0.0,
        )
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
            other=0.0,
        )
        x = dropout_tile(x, offs_m, offs_k, key, threshold, keep_scale, INTERPRETING)
        acc = mma(g_t, x, acc, DOT_PRECISION, INTERPRETING)
    tl.store(
        part_ptr + split * stride_ps + ranks[:, None] * stride_pr + cols[None, :] * stride_pk,
        acc * scale,
        mask=(offs_r[:, None] < R) & (offs_k[None, :] < K),
    )


@on_tensor_device
def dropout_lowrank(x: torch.Tensor, lora_A: torch.Tensor, dropout: DropoutSpec) -> torch.Tensor:
    """``drop(x) Aᵀ`` (M, r) in ``x``'s dtype; ``x`` (M, K) any strides, ``lora_A`` (r, K)."""
    (M, K), r = x.shape, lora_A.shape[0]
    xa = x.new_empty(M, r)
    r_block = rank_block(r)

    def grid(meta):
        return triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(r, r_block)

    launch(
        _dropout_lowrank_kernel,
        grid,
        (
            xa,
            x,
            lora_A,
            M,
            K,
            r,
            m_bucket(M),
            xa.stride(0),
            xa.stride(1),
            x.stride(0),
            x.stride(1),
            lora_A.stride(0),
            lora_A.stride(1),
            *dropout_arguments(dropout),
        ),
        {
            "R_BLOCK": r_block,
            "DOT_PRECISION": dot_precision(x.dtype),
            "INTERPRETING": INTERPRETING,
        },
    )
    return xa


@on_tensor_device
def dropout_lowrank_grad(
    grad: torch.Tensor, x: torch.Tensor, dropout: DropoutSpec, scale: float = 1.0
) -> torch.Tensor:
    """``scale · Gᵀ drop(x)`` (r, K) in float32 for ``G = grad`` (M, r) and ``x`` (M, K).

    The reduction over M is split in up to 16 row ranges whose fp32 partials (each scaled
    in the kernel) are summed here, so that enough programs run when ``K`` is small; the
    order is fixed, so the result is deterministic. One range (M ≤ 256) is written as the
    result itself: no partials, no sum.
    """
    (M, K), r = x.shape, grad.shape[1]
    rows_per_split = max(
        _GRAD_ROWS_PER_SPLIT,
        triton.cdiv(triton.cdiv(M, _GRAD_MAX_SPLITS), _GRAD_ROWS_PER_SPLIT) * _GRAD_ROWS_PER_SPLIT,
    )
    splits = max(1, triton.cdiv(M, rows_per_split))  # M = 0: one split, of no rows (zeros)
    shape = (r, K) if splits == 1 else (splits, r, K)
    partials = torch.empty(shape, device=x.device, dtype=torch.float32)
    r_block = rank_block(r)

    def grid(meta):
        return triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(r, r_block), splits

    launch(
        _dropout_lowrank_grad_kernel,
        grid,
        (
            partials,
            grad,
            x,
            M,
            K,
            r,
            rows_per_split,
            m_bucket(M),
            0 if splits == 1 else partials.stride(0),
            *partials.stride()[-2:],
            grad.stride(0),
            grad.stride(1),
            x.stride(0),
            x.stride(1),
            float32_scalar(scale),
            *dropout_arguments(dropout),
        ),
        {
            "R_BLOCK": r_block,
            "DOT_PRECISION": dot_precision(x.dtype),
            "INTERPRETING": INTERPRETING,
        },
    )
    return partials if splits == 1 else partials.sum(0)
