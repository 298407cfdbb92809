"""The fp8 compute mode's primitives in Triton (``docs/fp8.md``): rows quantized into the
activation format, and GEMMs on two fp8 operands with their scales in the epilogue.

* :func:`quantize_rows`: ``p`` (M, K) (times W's row scales per column for dX) into e4m3
  codes with per-row absmax scales, and the thin product ``drop(p) Lᵀ`` (M, r) from the same
  tiles: a program owns ``BLOCK_M`` whole rows and sweeps them twice, the first for the rows'
  peaks and the thin product, the second for the codes (``p`` read twice: from L2 where the
  programs' rows fit there, docs/fp8.md). Codes and scales are those of
  :func:`lorasc_kernels.formats.quantize.quantize_rows` bit for bit (division ``div_rn``,
  rounding on integers by :func:`.merge_scaled.encode_scaled`).
* :func:`scaled_rows_gemm`: ``out = s_a[m] · (a_codes · b_codesᵀ)[m, n] · s_b[n] (+ bias) +
  scale · drop(U Vᵀ)``: both operands fp8 in ``tl.dot`` (``QGMMA`` on sm_90), accumulated
  in float32, the row scales, the bias and the rank term applied in the epilogue. Forward:
  ``b = W`` (N, K), read K-major. dX: ``b = Wᵀ`` read from W's codes by strides, without
  ``s_b`` (W's scales were folded into ``a``), and ``V = Aᵀ`` from ``A`` (r, N) likewise;
  its tile is not K-major, which Hopper's fp8 MMA needs, so Triton transposes it on its way
  into shared memory (the compile gate counts it): no transposed copy of the codes exists,
  so none can disagree with a merge.

Hopper's fp8 MMA accumulates with fewer bits than float32 (DeepSeek-V3's report: about 14
on the H800), and Triton lets it run unpromoted over the whole reduction by default on
sm_90; here every ``BLOCK_K`` (128) step's products are summed apart and added to the
float32 accumulator (``max_num_imprecise_acc=BLOCK_K``, as DeepSeek-V3 promotes every 128),
so a long reduction keeps float32's precision across steps (not measured on a GPU).

In the interpreter the codes are decoded to float32 (:func:`.device.decode_scaled`, exact)
and the dot runs in float32: products of two fp8 values are exact there, the sums are
float32's in the interpreter's order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...formats.registry import ACTIVATION_FORMAT, SCALED_DTYPES, WEIGHT_FORMATS
from ...formats.scaled_weight import ScaledWeight
from ..specs import DropoutSpec
from .configs import (
    dot_precision,
    fp8_compute_configs,
    gemm_scalars,
    prune_fp32_outputs,
    rank_block,
    thin_configs,
)
from .device import (
    INTERPRETING,
    decode_scaled,
    dropout_tile,
    grouped_tile,
    mma,
    rank_term,
    round_to,
)
from .fused_linear import dropout_arguments, gemm_operands
from .fused_linear_scaled import format_fields
from .launch import launch
from .merge_scaled import encode_scaled

__all__ = ["SCALED_DTYPES", "fp8_operand", "quantize_rows", "scaled_rows_gemm"]

_ACTIVATION = WEIGHT_FORMATS[ACTIVATION_FORMAT]


@triton.jit
def fp8_operand(
    codes,
    MANTISSA_BITS: tl.constexpr,
    EXPONENT_BIAS: tl.constexpr,
    HAS_INFINITY: tl.constexpr,
    INTERPRETING: tl.constexpr,
):
    """A tile of fp8 codes loaded as bytes as an MMA operand: the format's Triton fp8 type
    on a GPU (e4m3fn: 3 mantissa bits, e5m2: 2), float32 in the interpreter (exact)."""
    if INTERPRETING:
        return decode_scaled(codes, MANTISSA_BITS, EXPONENT_BIAS, HAS_INFINITY)
    FP8: tl.constexpr = tl.float8e4nv if MANTISSA_BITS == 3 else tl.float8e5
    return codes.to(FP8, bitcast=True)


@triton.jit
def _row_values(p_ptrs, col_scale_ptr, ks, mask, K, HAS_COL_SCALE: tl.constexpr):
    """A [BLOCK_M, BLOCK_K] tile of ``p`` as loaded, and in float32 times the column scales."""
    tile = tl.load(p_ptrs, mask=mask, other=0.0)
    values = tile.to(tl.float32)
    if HAS_COL_SCALE:
        values = values * tl.load(col_scale_ptr + ks, mask=ks < K, other=0.0)[None, :]
    return tile, values


@triton.autotune(configs=thin_configs(), key=["K", "R_BLOCK", "HAS_COL_SCALE", "LOWRANK"])
@triton.jit(do_not_specialize=["dropout_key", "dropout_threshold"])
def _quantize_rows_kernel(
    codes_ptr,  # (M, K) bytes, contiguous
    row_scale_ptr,  # (M,) float32
    pl_ptr,  # (M, R) in p's dtype, contiguous
    p_ptr,
    col_scale_ptr,  # (K,) float32
    l_ptr,  # (R, K)
    M,
    K,
    R,
    stride_pm,
    stride_pk,
    stride_lr,
    stride_lk,
    dropout_key,
    dropout_threshold,
    keep_scale,
    HAS_COL_SCALE: tl.constexpr,
    LOWRANK: tl.constexpr,
    LORA_DROPOUT: tl.constexpr,
    R_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MAX_VALUE: tl.constexpr,
    MIN_SCALE: tl.constexpr,
    MANTISSA_BITS: tl.constexpr,
    EXPONENT_BIAS: tl.constexpr,
    INTERPRETING: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program: ``BLOCK_M`` whole rows, swept twice (module docstring)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)
    mask_m = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_BLOCK)
    peak = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pl = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + offs_k).to(tl.int64)
        mask = mask_m[:, None] & (ks < K)[None, :]
        p_ptrs = p_ptr + rows[:, None] * stride_pm + ks[None, :] * stride_pk
        tile, values = _row_values(p_ptrs, col_scale_ptr, ks, mask, K, HAS_COL_SCALE)
        peak = tl.maximum(peak, tl.max(tl.abs(values), axis=1))
        if LOWRANK:
            if LORA_DROPOUT:
                tile = dropout_tile(
                    tile, rows, ks, dropout_key, dropout_threshold, keep_scale, INTERPRETING
                )
            l_t = tl.load(
                l_ptr + offs_r[None, :].to(tl.int64) * stride_lr + ks[:, None] * stride_lk,
                mask=(ks < K)[:, None] & (offs_r < R)[None, :],
                other=0.0,
            )
            pl = mma(tile, l_t, pl, DOT_PRECISION, INTERPRETING)
    if LOWRANK:
        tl.store(
            pl_ptr + rows[:, None] * R + offs_r[None, :],
            round_to(pl, pl_ptr.dtype.element_ty, INTERPRETING),
            mask=mask_m[:, None] & (offs_r < R)[None, :],
        )
    # formats.quantize.row_scales: peak / max_value, at least MIN_SCALE, one ulp up where the
    # peak would land above max_value; 1 for an all-zero row
    scale = tl.where(peak > 0, tl.maximum(tl.math.div_rn(peak, MAX_VALUE), MIN_SCALE), 1.0)
    above = tl.math.div_rn(peak, scale) > MAX_VALUE
    scale = tl.where(
        above, (scale.to(tl.uint32, bitcast=True) + 1).to(tl.float32, bitcast=True), scale
    )
    tl.store(row_scale_ptr + rows, scale, mask=mask_m)
    MIN_FIELD: tl.constexpr = 127 + 1 - EXPONENT_BIAS
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + offs_k).to(tl.int64)
        mask = mask_m[:, None] & (ks < K)[None, :]
        p_ptrs = p_ptr + rows[:, None] * stride_pm + ks[None, :] * stride_pk
        _, values = _row_values(p_ptrs, col_scale_ptr, ks, mask, K, HAS_COL_SCALE)
        y = tl.math.div_rn(values, scale[:, None])
        codes = encode_scaled(y, 0, False, MANTISSA_BITS, MIN_FIELD)
        tl.store(codes_ptr + rows[:, None] * K + ks[None, :], codes, mask=mask)


def quantize_rows(
    p: torch.Tensor,
    col_scale: torch.Tensor | None = None,
    lowrank: torch.Tensor | None = None,
    dropout: DropoutSpec | None = None,
) -> tuple[ScaledWeight, torch.Tensor | None]:
    """``(rows, pl)``: ``p`` (M, K) (times ``col_scale`` (K,)) as a :class:`ScaledWeight` of
    e4m3 codes with per-row scales, and ``drop(p) lowrankᵀ`` (M, r) in ``p``'s dtype for
    ``lowrank`` (r, K) (any strides), else None; the contract's primitive."""
    M, K = p.shape
    codes = torch.empty(M, K, device=p.device, dtype=_ACTIVATION)
    row_scale = torch.empty(M, device=p.device, dtype=torch.float32)
    r = 0 if lowrank is None else lowrank.shape[0]
    pl = None if lowrank is None else torch.empty(M, r, device=p.device, dtype=p.dtype)
    entry = ScaledWeight(codes, row_scale).format

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]),)

    launch(
        _quantize_rows_kernel,
        grid,
        (
            codes.view(torch.uint8),
            row_scale,
            row_scale if pl is None else pl,
            p,
            row_scale if col_scale is None else col_scale.contiguous(),
            p if lowrank is None else lowrank,
            M,
            K,
            r,
            *p.stride(),
            *((0, 0) if lowrank is None else lowrank.stride()),
            *dropout_arguments(dropout),
        ),
        {
            "HAS_COL_SCALE": col_scale is not None,
            "LOWRANK": lowrank is not None,
            "LORA_DROPOUT": dropout is not None and lowrank is not None,
            "R_BLOCK": rank_block(r),
            "DOT_PRECISION": dot_precision(p.dtype),
            "MAX_VALUE": entry.max_value,
            "MIN_SCALE": entry.min_scale,
            "MANTISSA_BITS": entry.mantissa_bits,
            "EXPONENT_BIAS": entry.exponent_bias,
            "INTERPRETING": INTERPRETING,
            "enable_fp_fusion": False,
        },
    )
    return ScaledWeight(codes, row_scale), pl


@triton.autotune(
    configs=fp8_compute_configs(),
    key=["M_BUCKET", "N", "K", "R", "B_TRANSPOSED"],
    prune_configs_by={"early_config_prune": prune_fp32_outputs},
)
@triton.jit(do_not_specialize=["dropout_key", "dropout_threshold"])
def _scaled_rows_gemm_kernel(
    out_ptr,
    a_ptr,  # (M, K) codes as bytes
    a_scale_ptr,  # (M,) float32
    b_ptr,  # codes as bytes, read as b[n, k]
    b_scale_ptr,  # (N,) float32, with B_SCALE
    bias_ptr,
    u_ptr,
    v_ptr,
    M,
    N,
    K,
    R,
    M_BUCKET,  # autotuning key: M rounded up to a power of two
    stride_om,
    stride_on,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_um,
    stride_ur,
    stride_vn,
    stride_vr,
    scale,
    dropout_key,
    dropout_threshold,
    keep_scale,
    B_SCALE: tl.constexpr,
    B_TRANSPOSED: tl.constexpr,  # the autotuning key's dX flag (the strides say the rest)
    HAS_BIAS: tl.constexpr,
    LORA_DROPOUT: tl.constexpr,
    R_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    A_MANTISSA_BITS: tl.constexpr,
    A_EXPONENT_BIAS: tl.constexpr,
    A_HAS_INFINITY: tl.constexpr,
    MANTISSA_BITS: tl.constexpr,
    EXPONENT_BIAS: tl.constexpr,
    HAS_INFINITY: tl.constexpr,
    INTERPRETING: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One program: the ``BLOCK_M × BLOCK_N`` tile of ``out`` (module docstring)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    ks = offs_k.to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + cols[None, :] * stride_bn + ks[:, None] * stride_bk  # [BLOCK_K, BLOCK_N]
    a_step = tl.full((), BLOCK_K, tl.int64) * stride_ak
    b_step = tl.full((), BLOCK_K, tl.int64) * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0)
        a = fp8_operand(a, A_MANTISSA_BITS, A_EXPONENT_BIAS, A_HAS_INFINITY, INTERPRETING)
        b = fp8_operand(b, MANTISSA_BITS, EXPONENT_BIAS, HAS_INFINITY, INTERPRETING)
        if INTERPRETING:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:  # each K step's products summed apart, then added in float32 (see module doc)
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
        a_ptrs += a_step
        b_ptrs += b_step

    acc = acc * tl.load(a_scale_ptr + rows, mask=mask_m, other=0.0)[:, None]
    if B_SCALE:
        acc = acc * tl.load(b_scale_ptr + cols, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    acc += rank_term(
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
    tl.store(
        out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
        round_to(acc, out_ptr.dtype.element_ty, INTERPRETING),
        mask=mask_m[:, None] & mask_n[None, :],
    )


def _fields(prefix: str, weight: ScaledWeight) -> dict:
    return {prefix + name: value for name, value in format_fields(weight).items()}


def scaled_rows_gemm(
    a: ScaledWeight,
    weight: ScaledWeight,
    bias: torch.Tensor | None,
    u: torch.Tensor | None,
    v: torch.Tensor | None,
    scale: float,
    out_dtype: torch.dtype,
    q_transposed: bool = False,
    rank_dropout: DropoutSpec | None = None,
) -> torch.Tensor:
    """``out`` (M, N) in ``out_dtype``: forward ``deq(a) deq(W)ᵀ (+ bias) + scale · U Vᵀ``,
    with ``q_transposed`` ``deq(a) codes(W) + scale · drop(U V)`` (``v`` (r, N) as stored); the
    contract's primitive.
    ``a`` (M, K) contiguous codes, ``weight`` any strides; ``u = v = None``: no rank term."""
    out, codes, bias, u, v, r, _, b_strides, v_strides = gemm_operands(
        a.codes, weight.codes, bias, u, v, None, q_transposed, out_dtype
    )
    (M, K), N = a.shape, out.shape[1]

    bucket, scale32, r_block, precision = gemm_scalars(M, r, scale, u.dtype)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    launch(
        _scaled_rows_gemm_kernel,
        grid,
        (
            out,
            a.codes.view(torch.uint8),
            a.scale.contiguous(),
            codes.view(torch.uint8),
            weight.scale.contiguous(),
            out if bias is None else bias,
            u,
            v,
            M,
            N,
            K,
            r,
            bucket,
            *out.stride(),
            *a.codes.stride(),
            *b_strides,
            *u.stride(),
            *v_strides,
            scale32,
            *dropout_arguments(rank_dropout),
        ),
        {
            "B_SCALE": not q_transposed,
            "B_TRANSPOSED": q_transposed,
            "HAS_BIAS": bias is not None,
            "LORA_DROPOUT": rank_dropout is not None,
            "R_BLOCK": r_block,
            "DOT_PRECISION": precision,
            **_fields("A_", a),
            **format_fields(weight),
            "INTERPRETING": INTERPRETING,
        },
    )
    return out
