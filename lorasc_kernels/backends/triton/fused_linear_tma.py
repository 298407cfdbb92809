"""The persistent, TMA-fed variant of the fused low-rank GEMM (Hopper, 16-bit operands):
``out = P (Q ⊕ noise)ᵀ (+ bias) + s · drop(U Vᵀ)``, the same computation, in the same order,
as :func:`.fused_linear.tiled_lowrank_gemm`.

Shapes: ``p`` (M, K), ``q`` (N, K), ``bias`` (N,), ``u`` (M, r), ``v`` (N, r) (for dX ``W``
and ``A`` as stored, read transposed). One program per SM walks the output tiles
(``GROUP_M``-grouped, as the tiled kernel orders them); the ``P`` and ``Q`` tiles and the
output come and go through tensor descriptors (``tl.make_tensor_descriptor``: TMA on sm_90),
the K loop software-pipelined by Triton, the output stored in two ``BLOCK_N / 2`` halves.
The rank term, dropout mask, noise and bias are the tiled kernel's device functions
(:mod:`.device`), in its order (rank term first, K steps in order, bias last), so both
variants round the same sums.

Where it applies (:func:`unsupported_reason`): bf16/fp16 operands of one dtype, unscaled
weights, ``P`` and ``out`` with unit column stride, ``Q`` with one unit stride (``W`` or
``Wᵀ`` read as stored), 16-byte aligned base pointers and non-unit strides, and on a GPU
compute capability ≥ 9.0. Elsewhere the tiled kernel runs.

Descriptors built on the device need a global workspace: the launcher installs a torch
allocator with ``triton.set_allocator`` when none is set (Triton 3.6 and 3.8).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from ..specs import DropoutSpec, NoiseSpec
from .configs import gemm_scalars, persistent_configs, prune_noisy_tiles
from .device import INTERPRETING, add_noise_tile, grouped_tile, mma, rank_term, round_to
from .fused_linear import gemm_operands, spec_arguments
from .launch import launch

__all__ = [
    "TMA_DTYPES",
    "aligned",
    "store_tile",
    "ensure_allocator",
    "lacks_tma",
    "persistent_programs",
    "unsupported_reason",
    "persistent_lowrank_gemm",
]

TMA_DTYPES = (torch.bfloat16, torch.float16)
_TMA_ALIGN_BYTES = 16
# Programs of the persistent grid under the interpreter: two, so each walks several tiles.
_INTERPRETER_PROGRAMS = 2


@triton.jit
def store_tile(out_desc, acc, row, col, BLOCK_N: tl.constexpr, INTERPRETING: tl.constexpr):
    """Round the fp32 tile ``acc`` to ``out``'s dtype and store it at ``(row, col)`` as two
    ``BLOCK_N / 2`` halves (half the epilogue's shared memory, left to the pipeline)."""
    dtype: tl.constexpr = out_desc.dtype
    halves = tl.permute(tl.reshape(acc, (acc.shape[0], 2, BLOCK_N // 2)), (0, 2, 1))
    left, right = tl.split(halves)
    out_desc.store([row, col], round_to(left, dtype, INTERPRETING))
    out_desc.store([row, col + BLOCK_N // 2], round_to(right, dtype, INTERPRETING))


@triton.autotune(
    configs=persistent_configs(),
    key=["M_BUCKET", "N", "K", "R", "FUSED_NOISE", "W_TRANSPOSED", "Q_N_CONTIGUOUS"],
    prune_configs_by={"early_config_prune": prune_noisy_tiles},
)
@triton.jit(do_not_specialize=["noise_key", "dropout_key", "dropout_threshold"])
def _persistent_lowrank_kernel(
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
    M_BUCKET,  # autotuning key: M rounded up to a power of two
    stride_om,
    stride_pm,
    stride_q,  # Q's non-unit stride: along N (Q_N_CONTIGUOUS false) or along K
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
    Q_N_CONTIGUOUS: tl.constexpr,  # Q's unit stride is along N (Q = Wᵀ of a row-major W)
    LORA_DROPOUT: tl.constexpr,
    R_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRETING: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Program ``i`` of ``G``: output tiles ``i, i + G, i + 2G, …`` (``G`` ≤ the SM count)."""
    p_desc = tl.make_tensor_descriptor(p_ptr, [M, K], [stride_pm, 1], [BLOCK_M, BLOCK_K])
    if Q_N_CONTIGUOUS:  # Qᵀ (K, N) is row-major: its tiles load as [BLOCK_K, BLOCK_N]
        q_desc = tl.make_tensor_descriptor(q_ptr, [K, N], [stride_q, 1], [BLOCK_K, BLOCK_N])
    else:
        q_desc = tl.make_tensor_descriptor(q_ptr, [N, K], [stride_q, 1], [BLOCK_N, BLOCK_K])
    out_desc = tl.make_tensor_descriptor(out_ptr, [M, N], [stride_om, 1], [BLOCK_M, BLOCK_N // 2])

    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile_id in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=True):
        pid_m, pid_n = grouped_tile(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
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
        for k0 in range(0, K, BLOCK_K):  # out-of-range rows and columns load as zeros
            p = p_desc.load([pid_m * BLOCK_M, k0])
            if Q_N_CONTIGUOUS:
                q_t = q_desc.load([k0, pid_n * BLOCK_N])
            else:
                q_t = q_desc.load([pid_n * BLOCK_N, k0]).T
            if FUSED_NOISE:
                q_t = add_noise_tile(
                    q_t,
                    k0 + tl.arange(0, BLOCK_K),
                    offs_n,
                    noise_key,
                    noise_scale,
                    W_TRANSPOSED,
                    INTERPRETING,
                )
            acc = mma(p, q_t, acc, DOT_PRECISION, INTERPRETING)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        store_tile(out_desc, acc, pid_m * BLOCK_M, pid_n * BLOCK_N, BLOCK_N, INTERPRETING)


def aligned(tensor: torch.Tensor, stride: int) -> bool:
    """The base pointer and ``stride`` (in elements) of ``tensor`` are 16-byte aligned."""
    return (
        tensor.data_ptr() % _TMA_ALIGN_BYTES == 0
        and stride * tensor.element_size() % _TMA_ALIGN_BYTES == 0
    )


@functools.cache
def _properties(index: int):
    """CUDA device ``index``'s properties, read once per process: the query costs
    microseconds, and the persistent variants ask at each launch."""
    return torch.cuda.get_device_properties(index)


def lacks_tma(device: torch.device) -> bool:
    """Whether ``device`` is a GPU below compute capability 9.0 (no TMA)."""
    if device.type != "cuda":
        return False
    properties = _properties(device.index)
    return (properties.major, properties.minor) < (9, 0)


def unsupported_reason(p, q, q_transposed: bool = False) -> str | None:
    """``None`` if :func:`persistent_lowrank_gemm` takes these operands, else why not (the
    tiled kernel takes them): TMA reads 16-bit tiles of non-empty 2-D tensors with a unit
    stride, 16-byte aligned base pointers and other strides. ``q`` is ``W`` as stored, read
    transposed with ``q_transposed``."""
    if p.dtype not in TMA_DTYPES or q.dtype != p.dtype:
        return f"the TMA variant takes bf16/fp16 P and Q of one dtype, got {p.dtype}/{q.dtype}"
    if p.numel() == 0 or q.numel() == 0:
        return "empty operands"
    if lacks_tma(p.device):
        return "TMA needs compute capability 9.0 or more"
    q_stride = q.stride(0) if q.stride(1) == 1 else q.stride(1) if q.stride(0) == 1 else None
    if p.stride(1) != 1 or q_stride is None:
        return "TMA reads tensors with a unit stride in their last dimension"
    out_row_bytes = q.shape[1 if q_transposed else 0] * p.element_size()
    if not (
        aligned(p, p.stride(0)) and aligned(q, q_stride) and out_row_bytes % _TMA_ALIGN_BYTES == 0
    ):
        return "TMA needs 16-byte aligned base pointers and strides"
    return None


def _workspace(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, device="cuda", dtype=torch.int8)


def ensure_allocator() -> None:
    """Give Triton an allocator for the descriptors' workspace, unless one is set."""
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_workspace)


def persistent_programs(device: torch.device) -> int:
    """Programs of a persistent grid on ``device``: one per SM (two in the interpreter)."""
    if device.type == "cuda":
        return _properties(device.index).multi_processor_count
    return _INTERPRETER_PROGRAMS


def persistent_lowrank_gemm(
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
    persistent TMA kernel; arguments as :func:`.fused_linear.tiled_lowrank_gemm` (no scaled
    weights), operands as :func:`unsupported_reason` accepts."""
    out, q, bias, u, v, r, noise, (stride_qn, stride_qk), v_strides = gemm_operands(
        p, q, bias, u, v, noise, q_transposed
    )
    (M, K), N = p.shape, out.shape[1]
    q_n_contiguous = stride_qk != 1
    if p.device.type == "cuda":
        ensure_allocator()
    programs = persistent_programs(p.device)

    bucket, scale32, r_block, precision = gemm_scalars(M, r, scale, p.dtype)

    def grid(meta):
        return (min(programs, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)

    launch(
        _persistent_lowrank_kernel,
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
            out.stride(0),
            p.stride(0),
            stride_qk if q_n_contiguous else stride_qn,
            *u.stride(),
            *v_strides,
            scale32,
            *spec_arguments(noise, rank_dropout),
        ),
        {
            "HAS_BIAS": bias is not None,
            "FUSED_NOISE": noise is not None,
            "W_TRANSPOSED": q_transposed,
            "Q_N_CONTIGUOUS": q_n_contiguous,
            "LORA_DROPOUT": rank_dropout is not None,
            "R_BLOCK": r_block,
            "DOT_PRECISION": precision,
            "INTERPRETING": INTERPRETING,
            "enable_fp_fusion": False,
        },
    )
    return out
