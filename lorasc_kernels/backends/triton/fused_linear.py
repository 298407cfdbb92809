"""Fused low-rank GEMM in Triton: ``out = P Qᵀ (+ bias) + s · drop(U Vᵀ)`` in one pass over
``out``, the tiled variant of the backend's ``lowrank_gemm`` primitive (one program per
output tile; :mod:`.fused_linear_tma` is the persistent TMA variant, :mod:`.gemm_dispatch`
chooses).

Shapes: ``p`` (M, K), ``q`` (N, K), ``bias`` (N,), ``u`` (M, r), ``v`` (N, r). The linear's
forward uses it as ``y = x Wᵀ + b + s · xa Bᵀ``; its backward as ``dX = dY W + s ·
drop((dY B) A)``, ``W`` and ``A`` passed as stored and read transposed through their
strides (no view, no copy) and the dropout mask applied to the rank term
(:mod:`lorasc_kernels.backends.composition`).

The rank-r term is one extra ``tl.dot`` of ``[BLOCK_M, r] × [r, BLOCK_N]`` into the fp32
accumulator of each output tile (r padded to a power of two ≥ 16, masked).

Fused noise: each loaded ``W`` tile gets ``noise.scale · noise(noise.seed, W row, W col)`` added
in fp32 and is rounded back to ``W``'s dtype before the dot, as
:func:`~lorasc_kernels.backends.reference.noisy_weight` does (kernels are compiled with
``enable_fp_fusion=False`` so the multiply and add are not contracted into an FMA, and the
noisy tile is bit-identical). In the GEMM, a ``W`` tile is loaded once per ``BLOCK_M`` rows,
so the hash runs ``M / BLOCK_M`` times per element of ``W``; above
:data:`NOISE_IN_GEMM_MAX_ROWS` rows a separate pass writes the noisy ``W`` once (one hash,
one read and one write per element) and the GEMM reads it instead.

fp32 operands use 3×tf32 dots (near-fp32 accuracy on tensor cores) when torch's fp32
matmul precision is ``"highest"`` (its default) and tf32 otherwise (see
:func:`.thin.dot_precision`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..specs import DropoutSpec, NoiseSpec
from .configs import fused_linear_configs, gemm_scalars, prune_by_operand_size
from .device import (
    INTERPRETING,
    add_noise_tile,
    grouped_tile,
    mma,
    rank_term,
    round_to,
)
from .launch import launch

__all__ = [
    "NOISE_IN_GEMM_MAX_ROWS",
    "noisy_weight_pass",
    "gemm_operands",
    "dropout_arguments",
    "spec_arguments",
    "tiled_lowrank_gemm",
]

# Rows of x (or dY) up to which the noise is added inside the GEMM (≤ 2 row tiles of 128);
# above, one separate pass over W is cheaper than hashing W once per row tile.
NOISE_IN_GEMM_MAX_ROWS = 256

# Tile of the stand-alone noisy-weight pass.
_NOISE_BLOCK = 64


@triton.autotune(
    configs=fused_linear_configs(),
    key=["M_BUCKET", "N", "K", "R", "FUSED_NOISE", "W_TRANSPOSED"],
    prune_configs_by={"early_config_prune": prune_by_operand_size},
)
@triton.jit(do_not_specialize=["noise_key", "dropout_key", "dropout_threshold"])
def _fused_lowrank_kernel(
    # out (M, N) = P (M, K) @ Q (N, K)ᵀ + bias (N,) + scale · drop(U (M, R) @ V (N, R)ᵀ)
    out_ptr,
    p_ptr,
    q_ptr,
    bias_ptr,
    u_ptr,
    v_ptr,
    M,
    N,
    K,
    R,
    M_BUCKET,  # autotuning key: M rounded up to a power of two (token counts vary per batch)
    stride_om,
    stride_on,
    stride_pm,
    stride_pk,
    stride_qn,
    stride_qk,
    stride_um,
    stride_ur,
    stride_vn,
    stride_vr,
    scale,
    noise_key,
    noise_scale,  # FUSED_NOISE: each Q tile += noise_scale · noise(W row, W col)
    dropout_key,
    dropout_threshold,
    keep_scale,  # LORA_DROPOUT: mask of the rank term's (m, n)
    HAS_BIAS: tl.constexpr,
    FUSED_NOISE: tl.constexpr,
    W_TRANSPOSED: tl.constexpr,
    LORA_DROPOUT: tl.constexpr,
    R_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRETING: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One program: one ``BLOCK_M × BLOCK_N`` tile of ``out``, row tiles grouped by ``GROUP_M``."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N

    # Rank-r term first, so the main loop accumulates on top of it.
    acc = rank_term(
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
        LORA_DROPOUT,
        R_BLOCK,
        DOT_PRECISION,
        INTERPRETING,
    )

    offs_k = tl.arange(0, BLOCK_K)
    p_ptrs = p_ptr + rows[:, None] * stride_pm + offs_k[None, :].to(tl.int64) * stride_pk
    q_ptrs = q_ptr + cols[None, :] * stride_qn + offs_k[:, None].to(tl.int64) * stride_qk
    p_step = tl.full((), BLOCK_K, tl.int64) * stride_pk
    q_step = tl.full((), BLOCK_K, tl.int64) * stride_qk
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        p = tl.load(p_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        q_t = tl.load(q_ptrs, mask=mask_n[None, :] & mask_k[:, None], other=0.0)
        if FUSED_NOISE:
            q_t = add_noise_tile(
                q_t, k0 + offs_k, offs_n, noise_key, noise_scale, W_TRANSPOSED, INTERPRETING
            )
        acc = mma(p, q_t, acc, DOT_PRECISION, INTERPRETING)
        p_ptrs += p_step
        q_ptrs += q_step

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
        round_to(acc, out_ptr.dtype.element_ty, INTERPRETING),
        mask=mask_m[:, None] & mask_n[None, :],
    )


@triton.jit(do_not_specialize=["key"])
def _noisy_weight_kernel(
    out_ptr,
    q_ptr,  # out (N, K) = round(Q (N, K) + noise_scale · noise(W row, W col))
    N,
    K,
    stride_on,
    stride_ok,
    stride_qn,
    stride_qk,
    key,
    noise_scale,
    W_TRANSPOSED: tl.constexpr,
    INTERPRETING: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program: one ``BLOCK × BLOCK`` tile, loaded as the GEMM loads it (``Qᵀ`` layout)."""
    offs_n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cols = offs_n.to(tl.int64)
    ks = offs_k.to(tl.int64)
    mask = (offs_n[None, :] < N) & (offs_k[:, None] < K)
    q_t = tl.load(q_ptr + cols[None, :] * stride_qn + ks[:, None] * stride_qk, mask=mask)
    q_t = add_noise_tile(q_t, offs_k, offs_n, key, noise_scale, W_TRANSPOSED, INTERPRETING)
    tl.store(out_ptr + cols[None, :] * stride_on + ks[:, None] * stride_ok, q_t, mask=mask)


def noisy_weight_pass(
    weight: torch.Tensor, noise: NoiseSpec, transposed: bool = False
) -> torch.Tensor:
    """``round(W + noise)`` (N, K), :func:`~lorasc_kernels.backends.reference.noisy_weight`
    written by one pass of the GEMM's tile loader, in ``W``'s layout.

    With ``transposed`` the kernel reads ``Wᵀ`` as backward's dX GEMM does (swapped indices);
    both orientations must equal
    :func:`~lorasc_kernels.backends.reference.noisy_weight` bit for bit.
    """
    q = weight.t() if transposed else weight
    out = torch.empty_like(q)
    grid = (triton.cdiv(q.shape[0], _NOISE_BLOCK), triton.cdiv(q.shape[1], _NOISE_BLOCK))
    _noisy_weight_kernel[grid](
        out,
        q,
        q.shape[0],
        q.shape[1],
        out.stride(0),
        out.stride(1),
        q.stride(0),
        q.stride(1),
        noise.key,
        noise.scale32,
        W_TRANSPOSED=transposed,
        INTERPRETING=INTERPRETING,
        BLOCK=_NOISE_BLOCK,
        enable_fp_fusion=False,
    )
    return out.t() if transposed else out


def gemm_operands(p, q, bias, u, v, noise: NoiseSpec | None, q_transposed: bool, out_dtype=None):
    """``(out, q, bias, u, v, r, noise, q_strides, v_strides)`` as the GEMM kernels take
    them: ``out`` (M, N) empty in ``out_dtype`` (None: ``P``'s dtype); above
    :data:`NOISE_IN_GEMM_MAX_ROWS` rows ``q`` is the noisy weight of
    :func:`noisy_weight_pass` and ``noise`` None; without a rank term ``u = v = out`` (never
    read: ``r = 0``); ``bias`` contiguous (read with stride 1). ``q_strides`` ``(n, k)`` and
    ``v_strides`` ``(n, r)`` are the strides of ``Q`` (N, K) and ``V`` (N, r) as the kernels
    index them: with ``q_transposed`` ``W`` and ``A``'s, swapped (read transposed without a
    view). ``q`` may be a scaled weight's codes (then ``noise`` is None), ``p`` fp8 codes
    (then ``out_dtype`` is given)."""
    if noise is not None and p.shape[0] > NOISE_IN_GEMM_MAX_ROWS:
        q, noise = noisy_weight_pass(q, noise), None
    # p.new_empty: 0.3 µs less than torch.empty(..., device=, dtype=)
    rows, cols = p.shape[0], q.shape[1 if q_transposed else 0]
    out = (
        p.new_empty(rows, cols) if out_dtype is None else p.new_empty((rows, cols), dtype=out_dtype)
    )
    r = 0 if u is None else u.shape[1]
    if u is None:
        u = v = out
    bias = None if bias is None else bias.contiguous()
    q_strides, v_strides = q.stride(), v.stride()
    if q_transposed:  # inline, not a helper: a frame per launch is host time at every step
        q_strides, v_strides = q_strides[::-1], v_strides[::-1]
    return out, q, bias, u, v, r, noise, q_strides, v_strides


_NO_DROPOUT_ARGUMENTS = (0, 0, 1.0)
_NO_SPEC_ARGUMENTS = (0, 0.0, *_NO_DROPOUT_ARGUMENTS)


def dropout_arguments(dropout: DropoutSpec | None) -> tuple:
    """``(dropout_key, dropout_threshold, keep_scale)`` as the kernels take them;
    ``(0, 0, 1.0)`` without dropout."""
    if dropout is None:
        return _NO_DROPOUT_ARGUMENTS
    return dropout.key, dropout.threshold, dropout.keep_scale


def spec_arguments(noise: NoiseSpec | None, rank_dropout: DropoutSpec | None) -> tuple:
    """``(noise_key, noise_scale, dropout_key, dropout_threshold, keep_scale)`` as the GEMM
    kernels take them; ``(0, 0.0)`` without noise, :func:`dropout_arguments` after."""
    if noise is None and rank_dropout is None:
        return _NO_SPEC_ARGUMENTS
    noise_arguments = (0, 0.0) if noise is None else (noise.key, noise.scale32)
    return noise_arguments + dropout_arguments(rank_dropout)


def tiled_lowrank_gemm(
    p,
    q,
    bias,
    u,
    v,
    scale,
    noise: NoiseSpec | None = None,
    q_transposed: bool = False,
    rank_dropout: DropoutSpec | None = None,
) -> torch.Tensor:
    """``out = P (Q ⊕ noise)ᵀ (+ bias) + scale · drop(U Vᵀ)`` (M, N) in ``P``'s dtype, by the
    tiled kernel: one program per output tile, any dtype, layout and weight format.

    ``q`` is ``W`` (N, K) and ``v`` (N, r); with ``q_transposed`` ``W`` (K, N) and ``v``
    (r, N) as stored, read transposed (``P (Q ⊕ noise) + scale · drop(U V)``); any
    strides. Up to :data:`NOISE_IN_GEMM_MAX_ROWS` rows the noise is added to each loaded
    ``Q`` tile, above by one pass that writes the noisy ``W``. A float ``W`` only: a scaled
    one has its own kernels (:mod:`.fused_linear_scaled`).
    """
    out, q, bias, u, v, r, noise, q_strides, v_strides = gemm_operands(
        p, q, bias, u, v, noise, q_transposed
    )
    (M, K), N = p.shape, out.shape[1]
    bucket, scale32, r_block, precision = gemm_scalars(M, r, scale, p.dtype)

    def grid(meta):
        return (-(M // -meta["BLOCK_M"]) * -(N // -meta["BLOCK_N"]),)  # ceil divisions

    launch(
        _fused_lowrank_kernel,
        grid,
        (
            out,
            p,
            q,
            out if bias is None else bias,
            u,
            v,
            M,
            N,
            K,
            r,
            bucket,
            *out.stride(),
            *p.stride(),
            *q_strides,
            *u.stride(),
            *v_strides,
            scale32,
            *spec_arguments(noise, rank_dropout),
        ),
        {
            "HAS_BIAS": bias is not None,
            "FUSED_NOISE": noise is not None,
            "W_TRANSPOSED": q_transposed,
            "LORA_DROPOUT": rank_dropout is not None,
            "R_BLOCK": r_block,
            "DOT_PRECISION": precision,
            "INTERPRETING": INTERPRETING,
            "enable_fp_fusion": False,
        },
    )
    return out
