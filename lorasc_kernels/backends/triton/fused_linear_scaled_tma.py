"""The persistent, TMA-fed variant of the scaled-weight GEMM of :mod:`.fused_linear_scaled`:
the same computation in the same order (bit-identical under the interpreter), one program
per SM walking the output tiles as :mod:`.fused_linear_tma` does for float weights. The
``x`` and code tiles come through tensor descriptors (TMA on sm_90), the codes as bytes
reinterpreted as the format's fp8 type in registers; the converted weight tile is the MMA's
register operand, as in the tiled variant. Where it applies: :func:`scaled_unsupported_reason`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...formats.scaled_weight import ScaledWeight
from ..specs import DropoutSpec
from .configs import gemm_scalars, persistent_scaled_configs
from .device import grouped_tile, mma, rank_term
from .fused_linear import dropout_arguments, gemm_operands
from .fused_linear_scaled import gemm_constexprs, scaled_end, scaled_start, scaled_weight_tile
from .fused_linear_tma import (
    TMA_DTYPES,
    aligned,
    ensure_allocator,
    lacks_tma,
    persistent_programs,
    store_tile,
)
from .launch import launch

__all__ = ["scaled_unsupported_reason", "persistent_scaled_lowrank_gemm"]


@triton.autotune(
    configs=persistent_scaled_configs(),
    key=["M_BUCKET", "N", "K", "R", "W_TRANSPOSED"],
)
@triton.jit(do_not_specialize=["dropout_key", "dropout_threshold"])
def _persistent_scaled_kernel(
    out_ptr,
    p_ptr,
    w_ptr,  # the codes as bytes, (N, K) row-major, or (K, N) for dX (W_TRANSPOSED)
    bias_ptr,
    u_ptr,
    v_ptr,
    w_scale_ptr,  # W's row scales: per output column (forward), per reduction index (dX)
    M,
    N,
    K,
    R,
    M_BUCKET,
    stride_om,
    stride_pm,
    stride_w,
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
    """Program ``i`` of ``G``: output tiles ``i, i + G, …``, each as :func:`_scaled_lowrank_kernel`
    computes it, its tiles loaded through tensor descriptors (TMA on sm_90)."""
    p_desc = tl.make_tensor_descriptor(p_ptr, [M, K], [stride_pm, 1], [BLOCK_M, BLOCK_K])
    if W_TRANSPOSED:
        w_desc = tl.make_tensor_descriptor(w_ptr, [K, N], [stride_w, 1], [BLOCK_K, BLOCK_N])
    else:
        w_desc = tl.make_tensor_descriptor(w_ptr, [N, K], [stride_w, 1], [BLOCK_N, BLOCK_K])
    out_desc = tl.make_tensor_descriptor(out_ptr, [M, N], [stride_om, 1], [BLOCK_M, BLOCK_N // 2])

    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile_id in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=True):
        pid_m, pid_n = grouped_tile(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
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
        acc = scaled_start(acc, w_scale_ptr, offs_n, mask_n, W_TRANSPOSED)
        for k0 in range(0, K, BLOCK_K):  # out-of-range rows and columns load as zeros
            p = p_desc.load([pid_m * BLOCK_M, k0])
            if W_TRANSPOSED:
                w = w_desc.load([k0, pid_n * BLOCK_N]).T
            else:
                w = w_desc.load([pid_n * BLOCK_N, k0])
            w = scaled_weight_tile(
                w,
                p.dtype,
                w_scale_ptr,
                k0 + tl.arange(0, BLOCK_K),
                K,
                W_TRANSPOSED,
                MANTISSA_BITS,
                EXPONENT_BIAS,
                HAS_INFINITY,
                INTERPRETING,
            )
            acc = mma(w, p.T, acc, DOT_PRECISION, INTERPRETING)
        acc = scaled_end(acc, w_scale_ptr, bias_ptr, offs_n, mask_n, HAS_BIAS, W_TRANSPOSED)
        store_tile(out_desc, tl.trans(acc), pid_m * BLOCK_M, pid_n * BLOCK_N, BLOCK_N, INTERPRETING)


def scaled_unsupported_reason(p: torch.Tensor, weight: ScaledWeight) -> str | None:
    """``None`` if :func:`persistent_scaled_lowrank_gemm` takes these operands, else why not
    (:func:`scaled_lowrank_gemm` takes them): bf16/fp16 ``P`` with a unit column stride,
    the codes row-major, 16-byte aligned base pointers and row strides, and output rows of a
    multiple of 16 bytes (for dX, ``W``'s columns)."""
    codes = weight.codes
    if p.dtype not in TMA_DTYPES:
        return f"the TMA variant takes bf16/fp16 P, got {p.dtype}"
    if p.numel() == 0 or codes.numel() == 0:
        return "empty operands"
    if lacks_tma(p.device):
        return "TMA needs compute capability 9.0 or more"
    if p.stride(1) != 1 or codes.stride(1) != 1:
        return "TMA reads tensors with a unit stride in their last dimension"
    if not (aligned(p, p.stride(0)) and aligned(codes, codes.stride(0))):
        return "TMA needs 16-byte aligned base pointers and strides"
    if codes.shape[0] * p.element_size() % 16 or codes.shape[1] * p.element_size() % 16:
        return "TMA stores output rows of a multiple of 16 bytes"
    return None


def persistent_scaled_lowrank_gemm(
    p: torch.Tensor,
    weight: ScaledWeight,
    bias: torch.Tensor | None,
    u: torch.Tensor | None,
    v: torch.Tensor | None,
    scale: float,
    transposed: bool = False,
    rank_dropout: DropoutSpec | None = None,
) -> torch.Tensor:
    """:func:`scaled_lowrank_gemm` by the persistent TMA kernel, on operands that
    :func:`scaled_unsupported_reason` accepts."""
    out, codes, bias, u, v, r, _, _, v_strides = gemm_operands(
        p, weight.codes, bias, u, v, None, transposed
    )
    (M, K), N = p.shape, out.shape[1]
    if p.device.type == "cuda":
        ensure_allocator()
    programs = persistent_programs(p.device)

    bucket, scale32, r_block, precision = gemm_scalars(M, r, scale, p.dtype)

    def grid(meta):
        tiles = -(M // -meta["BLOCK_M"]) * -(N // -meta["BLOCK_N"])  # ceil divisions
        return (min(programs, tiles),)

    launch(
        _persistent_scaled_kernel,
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
            out.stride(0),
            p.stride(0),
            codes.stride(0),
            *u.stride(),
            *v_strides,
            scale32,
            *dropout_arguments(rank_dropout),
        ),
        gemm_constexprs(weight, bias, transposed, rank_dropout, r_block, precision),
    )
    return out
