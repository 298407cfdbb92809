"""The tiled fused low-rank GEMM for a scaled weight (fp8 codes with per-row scales,
``docs/fp8.md``): ``out = P (s ⊙ W)ᵀ (+ bias) + scale · drop(U Vᵀ)``, or for backward's dX
``out = P (s ⊙ W) + scale · drop(U V)``, ``s`` W's row scales.

Shapes: ``p`` (M, K), ``W`` codes (N_w, K_w), ``u`` (M, r), ``out`` (M, N): forward ``N =
N_w``, ``K = K_w``, ``v`` (N, r); dX ``N = K_w``, ``K = N_w``, ``v`` (r, N) (``A`` as
stored, read transposed).

The weight is the dot's first operand: each program computes the transposed output tile
``W_tile · P_tileᵀ`` ([BLOCK_N, BLOCK_M]) and stores it transposed. A Hopper warpgroup MMA
takes its first operand from registers, so the 8-bit codes are converted to ``P``'s dtype
in registers after the load and go straight into the MMA; as the second operand (the
layout of :mod:`.fused_linear`) they would be converted and written back to shared memory
in every step of the main loop (the compile gate checks the loop holds no shared-memory
store). Forward: the row scale of W is the output's column scale, applied to the
accumulator at the end (the rank term divided by it first). dX: the scale multiplies the
loaded tile's columns (W's rows, the reduction dimension), rounded to ``P``'s dtype as
:func:`~lorasc_kernels.backends.reference.lowrank_gemm` rounds the dequantized weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...formats.scaled_weight import ScaledWeight
from ..specs import DropoutSpec
from .configs import gemm_scalars, prune_by_operand_size, scaled_linear_configs
from .device import INTERPRETING, decode_scaled, grouped_tile, mma, rank_term, round_to
from .fused_linear import dropout_arguments, gemm_operands
from .launch import launch

__all__ = [
    "format_fields",
    "gemm_constexprs",
    "scaled_decoded",
    "scaled_weight_tile",
    "scaled_start",
    "scaled_end",
    "scaled_lowrank_gemm",
]


def format_fields(weight: ScaledWeight) -> dict:
    """The constexprs of a scaled weight's format (its registry entry's fields) as the
    kernels take them (the interpreter's decode)."""
    entry = weight.format
    return {
        "MANTISSA_BITS": entry.mantissa_bits,
        "EXPONENT_BIAS": entry.exponent_bias,
        "HAS_INFINITY": entry.has_infinity,
    }


def gemm_constexprs(
    weight: ScaledWeight,
    bias: torch.Tensor | None,
    transposed: bool,
    rank_dropout: DropoutSpec | None,
    r_block: int,
    precision: str,
) -> dict:
    """The constexprs (and compile options) of both scaled-weight GEMM kernels, tiled and
    persistent, as :func:`.launch.launch` takes them."""
    return {
        "HAS_BIAS": bias is not None,
        "W_TRANSPOSED": transposed,
        "LORA_DROPOUT": rank_dropout is not None,
        "R_BLOCK": r_block,
        "DOT_PRECISION": precision,
        **format_fields(weight),
        "INTERPRETING": INTERPRETING,
        "enable_fp_fusion": False,
    }


@triton.jit
def scaled_decoded(
    codes,
    dtype: tl.constexpr,
    MANTISSA_BITS: tl.constexpr,
    EXPONENT_BIAS: tl.constexpr,
    HAS_INFINITY: tl.constexpr,
    INTERPRETING: tl.constexpr,
):
    """A tile of fp8 codes loaded as bytes (uint8) in ``dtype``, exactly: reinterpreted as
    the format's Triton fp8 type and converted by the hardware on a GPU (e4m3fn: 3 mantissa
    bits, e5m2: 2), on integers in the interpreter (no fp8 arithmetic)."""
    if INTERPRETING:
        return decode_scaled(codes, MANTISSA_BITS, EXPONENT_BIAS, HAS_INFINITY).to(dtype)
    if MANTISSA_BITS == 3:
        return codes.to(tl.float8e4nv, bitcast=True).to(dtype)
    return codes.to(tl.float8e5, bitcast=True).to(dtype)


@triton.jit
def scaled_weight_tile(
    codes,
    dtype: tl.constexpr,
    w_scale_ptr,
    ks,
    K,
    W_TRANSPOSED: tl.constexpr,
    MANTISSA_BITS: tl.constexpr,
    EXPONENT_BIAS: tl.constexpr,
    HAS_INFINITY: tl.constexpr,
    INTERPRETING: tl.constexpr,
):
    """The MMA's first operand from a [BLOCK_N, BLOCK_K] tile of codes (bytes) whose
    reduction indices are ``ks``: decoded to ``dtype``; for dX (``W_TRANSPOSED``) times W's
    row scale on the reduction index, rounded to ``dtype``."""
    w = scaled_decoded(codes, dtype, MANTISSA_BITS, EXPONENT_BIAS, HAS_INFINITY, INTERPRETING)
    if W_TRANSPOSED:
        k_scale = tl.load(w_scale_ptr + ks, mask=ks < K, other=0.0)
        w = round_to(w.to(tl.float32) * k_scale[None, :], dtype, INTERPRETING)
    return w


@triton.jit
def scaled_start(rank, w_scale_ptr, cols, mask_n, W_TRANSPOSED: tl.constexpr):
    """The transposed accumulator [BLOCK_N, BLOCK_M] from the rank term [BLOCK_M, BLOCK_N];
    forward: divided by the output's column scales (W's row scales), which
    :func:`scaled_end` applies to the whole sum (one accumulator; scales > 0)."""
    acc = tl.trans(rank)
    if not W_TRANSPOSED:
        acc = acc / tl.load(w_scale_ptr + cols, mask=mask_n, other=1.0)[:, None]
    return acc


@triton.jit
def scaled_end(
    acc, w_scale_ptr, bias_ptr, cols, mask_n, HAS_BIAS: tl.constexpr, W_TRANSPOSED: tl.constexpr
):
    """The transposed output tile in float32: forward, times the column scales; plus the bias."""
    if not W_TRANSPOSED:
        acc = acc * tl.load(w_scale_ptr + cols, mask=mask_n, other=1.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    return acc


@triton.autotune(
    configs=scaled_linear_configs(),
    key=["M_BUCKET", "N", "K", "R", "W_TRANSPOSED"],
    prune_configs_by={"early_config_prune": prune_by_operand_size},
)
@triton.jit(do_not_specialize=["dropout_key", "dropout_threshold"])
def _scaled_lowrank_kernel(
    out_ptr,
    p_ptr,
    w_ptr,  # the codes as bytes, read as W[n, k] (forward) or W[k, n] (dX: W_TRANSPOSED)
    bias_ptr,
    u_ptr,
    v_ptr,
    w_scale_ptr,  # W's row scales: per output column (forward), per reduction index (dX)
    M,
    N,
    K,
    R,
    M_BUCKET,  # autotuning key: M rounded up to a power of two
    stride_om,
    stride_on,
    stride_pm,
    stride_pk,
    stride_wn,
    stride_wk,
    stride_um,
    stride_ur,
    stride_vn,
    stride_vr,
    scale,
    dropout_key,
    dropout_threshold,
    keep_scale,
    HAS_BIAS: tl.constexpr,
    W_TRANSPOSED: tl.constexpr,
    LORA_DROPOUT: tl.constexpr,
    R_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MANTISSA_BITS: tl.constexpr,
    EXPONENT_BIAS: tl.constexpr,
    HAS_INFINITY: tl.constexpr,
    INTERPRETING: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One program: the ``BLOCK_M × BLOCK_N`` tile of ``out``, accumulated transposed."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N

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
    acc = scaled_start(acc, w_scale_ptr, cols, mask_n, W_TRANSPOSED)  # [BLOCK_N, BLOCK_M]

    offs_k = tl.arange(0, BLOCK_K)
    ks = offs_k.to(tl.int64)
    w_ptrs = w_ptr + cols[:, None] * stride_wn + ks[None, :] * stride_wk  # [BLOCK_N, BLOCK_K]
    p_ptrs = p_ptr + rows[None, :] * stride_pm + ks[:, None] * stride_pk  # [BLOCK_K, BLOCK_M]
    w_step = tl.full((), BLOCK_K, tl.int64) * stride_wk
    p_step = tl.full((), BLOCK_K, tl.int64) * stride_pk
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        p_t = tl.load(p_ptrs, mask=mask_k[:, None] & mask_m[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0)
        w = scaled_weight_tile(
            w,
            p_t.dtype,
            w_scale_ptr,
            k0 + offs_k,
            K,
            W_TRANSPOSED,
            MANTISSA_BITS,
            EXPONENT_BIAS,
            HAS_INFINITY,
            INTERPRETING,
        )
        acc = mma(w, p_t, acc, DOT_PRECISION, INTERPRETING)
        w_ptrs += w_step
        p_ptrs += p_step

    acc = scaled_end(acc, w_scale_ptr, bias_ptr, cols, mask_n, HAS_BIAS, W_TRANSPOSED)
    tl.store(
        out_ptr + rows[None, :] * stride_om + cols[:, None] * stride_on,
        round_to(acc, out_ptr.dtype.element_ty, INTERPRETING),
        mask=mask_n[:, None] & mask_m[None, :],
    )


def scaled_lowrank_gemm(
    p: torch.Tensor,
    weight: ScaledWeight,
    bias: torch.Tensor | None,
    u: torch.Tensor | None,
    v: torch.Tensor | None,
    scale: float,
    transposed: bool = False,
    rank_dropout: DropoutSpec | None = None,
) -> torch.Tensor:
    """``out`` (M, N) in ``P``'s dtype: ``P (s ⊙ W)ᵀ (+ bias) + scale · drop(U Vᵀ)``, or with
    ``transposed`` (backward's dX) ``P (s ⊙ W) + scale · drop(U V)``, ``v`` (r, N) as stored;
    module docstring. ``weight`` any strides; without a rank term ``u = v = None``."""
    out, codes, bias, u, v, r, _, w_strides, v_strides = gemm_operands(
        p, weight.codes, bias, u, v, None, transposed
    )
    (M, K), N = p.shape, out.shape[1]

    bucket, scale32, r_block, precision = gemm_scalars(M, r, scale, p.dtype)

    def grid(meta):
        return (-(M // -meta["BLOCK_M"]) * -(N // -meta["BLOCK_N"]),)  # ceil divisions

    launch(
        _scaled_lowrank_kernel,
        grid,
        (
            out,
            p,
            codes.view(torch.uint8),
            out if bias is None else bias,
            u,
            v,
            weight.scale.contiguous(),
            M,
            N,
            K,
            r,
            bucket,
            *out.stride(),
            *p.stride(),
            *w_strides,
            *u.stride(),
            *v_strides,
            scale32,
            *dropout_arguments(rank_dropout),
        ),
        gemm_constexprs(weight, bias, transposed, rank_dropout, r_block, precision),
    )
    return out
