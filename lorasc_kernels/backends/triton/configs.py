"""Autotune configs of the fused low-rank linear and its thin products.

On a GPU: a handful of Hopper (H100/H200) tilings with 3-4 pipeline stages. Each K step
reads 128 bytes of every operand row: ``BLOCK_K = 64`` for 16-bit operands, 32 for
float32, which needs twice the shared memory per stage (:func:`prune_by_operand_size`
keeps the matching ones, so an fp32 call does not tune 16-bit tilings and vice versa).
Under ``TRITON_INTERPRET=1`` a single tiny config is used: the interpreter is slow, and one
config means nothing is benchmarked.
"""

from __future__ import annotations

import torch
import triton

from ...formats.registry import float32_scalar
from . import interpreting

__all__ = [
    "fused_linear_configs",
    "scaled_linear_configs",
    "fp8_compute_configs",
    "prune_fp32_outputs",
    "persistent_configs",
    "persistent_scaled_configs",
    "prune_by_operand_size",
    "prune_noisy_tiles",
    "thin_configs",
    "m_bucket",
    "rank_block",
    "dot_precision",
    "gemm_scalars",
]

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps)
_FUSED_HOPPER = (
    (128, 256, 64, 3, 8),
    (256, 128, 64, 3, 8),
    (128, 128, 64, 4, 8),
    (128, 128, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (128, 128, 32, 4, 8),
    (128, 64, 32, 4, 4),
    (64, 64, 32, 4, 4),
)
_K_STEP_ROW_BYTES = 128

# (BLOCK_M, BLOCK_K, num_stages, num_warps) of the thin (M × r) products. Hashing the x
# tile is register-hungry: compiled for sm_90, these run without spills up to R_BLOCK=64
# (64×128 tiles with 4 warps spill).
_THIN_HOPPER = (
    (64, 64, 4, 8),
    (128, 32, 4, 8),
    (32, 128, 4, 8),
    (64, 32, 4, 4),
)


def _gemm_configs(tilings) -> list[triton.Config]:
    """``BLOCK_M × BLOCK_N`` output tiles with ``GROUP_M`` swizzle, one per
    ``(BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps)`` of ``tilings``."""
    if interpreting():
        return [
            triton.Config(
                {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2},
                num_warps=1,
                num_stages=1,
            )
        ]
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
            num_stages=stages,
            num_warps=warps,
        )
        for bm, bn, bk, stages, warps in tilings
    ]


def fused_linear_configs() -> list[triton.Config]:
    """Configs of the tiled fused kernel: :data:`_FUSED_HOPPER`."""
    return _gemm_configs(_FUSED_HOPPER)


# The scaled-weight kernel holds the converted weight tile in registers (the MMA's register
# operand) beside the accumulator: compiled for sm_90, 128×256 tiles on 8 warps and 128×128
# on 4 spill; the other tiles of _FUSED_HOPPER do not.
_SCALED_HOPPER = tuple(
    tiling for tiling in _FUSED_HOPPER if tiling not in ((128, 256, 64, 3, 8), (128, 128, 64, 4, 4))
)


def scaled_linear_configs() -> list[triton.Config]:
    """Configs of the scaled-weight kernel (:mod:`.fused_linear_scaled`): :data:`_SCALED_HOPPER`."""
    return _gemm_configs(_SCALED_HOPPER)


# The fp8 compute mode's GEMM (:mod:`.fp8_compute`): two 1-byte operands, so 128-byte K
# steps are BLOCK_K = 128; the rank term's accumulator joins the main one in the epilogue.
# Compiled for sm_90, 128×256 tiles on 8 warps and 128×128 on 4 spill (two accumulators).
_FP8_COMPUTE_HOPPER = (
    (128, 128, 128, 4, 8),
    (64, 128, 128, 4, 4),
    (64, 128, 128, 4, 8),
    (64, 64, 128, 4, 4),
)
# Output elements per thread up to which float32 outputs (a float32 rank term, 3×tf32 dots)
# compile without spills on sm_90 (128×128 tiles on 8 warps and 64×128 on 4 spill).
_FP32_TILE_ELEMENTS_PER_THREAD = 32


def fp8_compute_configs() -> list[triton.Config]:
    """Configs of the fp8 compute mode's GEMM: :data:`_FP8_COMPUTE_HOPPER`."""
    return _gemm_configs(_FP8_COMPUTE_HOPPER)


def prune_fp32_outputs(configs, named_args, **kwargs) -> list[triton.Config]:
    """For float32 outputs, the fp8 compute configs that leave registers for the float32
    rank term (:data:`_FP32_TILE_ELEMENTS_PER_THREAD`); all configs otherwise."""
    if named_args["out_ptr"].dtype != torch.float32:
        return configs
    return [
        config
        for config in configs
        if config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"]
        <= _FP32_TILE_ELEMENTS_PER_THREAD * 32 * config.num_warps
    ]


def prune_by_operand_size(configs, named_args, **kwargs) -> list[triton.Config]:
    """The configs whose K step reads 128 bytes per row of the operand ``p_ptr``."""
    element_size = named_args["p_ptr"].element_size()
    return [
        config for config in configs if config.kwargs["BLOCK_K"] * element_size == _K_STEP_ROW_BYTES
    ]


def thin_configs() -> list[triton.Config]:
    """Configs of the thin products: ``BLOCK_M`` rows × ``BLOCK_K`` reduction per step."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_stages=stages, num_warps=warps)
        for bm, bk, stages, warps in _THIN_HOPPER
    ]


def m_bucket(m: int) -> int:
    """``m`` rounded up to a power of two (0 stays 0), as ``triton.next_power_of_2`` rounds
    it: the autotuners' key of the row count. Pure Python (no constexpr-function call)."""
    return 1 << (m - 1).bit_length() if m > 0 else 0


def rank_block(r: int) -> int:
    """Columns of the rank dimension per block: ``r`` padded to a power of two in [16, 64]."""
    return min(64, max(16, m_bucket(r)))


# torch's fp32 matmul precision, read without the Python frame of its public wrapper
# (``torch.get_float32_matmul_precision``, which calls this) at every GEMM launch (part of
# gemm_scalars' key)
_matmul_precision = getattr(
    torch._C, "_get_float32_matmul_precision", torch.get_float32_matmul_precision
)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for ``dtype`` operands, following torch's fp32 matmul
    precision (``torch.set_float32_matmul_precision``): at ``"highest"`` (torch's default)
    fp32 dots run as 3×tf32 ("tf32x3": error ~1e-6, on tensor cores, whereas Triton's
    IEEE fp32 dot runs on CUDA cores and spills registers at 128×128 tiles), else tf32.
    16-bit operands ignore it."""
    if dtype == torch.float32 and _matmul_precision() == "highest":
        return "tf32x3"
    return "tf32"


# (m, r, scale, dtype, torch's fp32 matmul precision) → gemm_scalars(m, r, scale, dtype) of
# the GEMM launches seen: one lookup where four calls cost microseconds per launch in a
# training step (benchmarks/bench_host.py); the precision is read at each call (torch's
# setting may change) and is part of the key. Zero scales are not kept (0.0 == -0.0 as
# keys, and a float32 -0.0 is another bit pattern). Bounded: cleared when full.
_GEMM_SCALARS: dict[tuple, tuple[int, float, int, str]] = {}
_GEMM_SCALARS_MAX = 4096


def gemm_scalars(m: int, r: int, scale: float, dtype: torch.dtype) -> tuple[int, float, int, str]:
    """``(m_bucket(m), float32_scalar(scale), rank_block(r), dot_precision(dtype))``: the
    scalars of a fused GEMM launch of ``m`` rows, rank ``r``, ``dtype`` operands."""
    key = (m, r, scale, dtype, _matmul_precision())
    found = _GEMM_SCALARS.get(key)
    if found is None:
        found = (m_bucket(m), float32_scalar(scale), rank_block(r), dot_precision(dtype))
        if scale:  # not zero (nor -0.0): kept
            if len(_GEMM_SCALARS) >= _GEMM_SCALARS_MAX:
                _GEMM_SCALARS.clear()
            _GEMM_SCALARS[key] = found
    return found


# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) of the persistent TMA variant (16-bit
# operands only, so 128-byte K steps): the tutorial's 128-row tiles with 3-4 stages, and
# narrower ones for problems with few tiles. Compiled for sm_90, none spills (128×128 tiles
# over 4 warps did, with r = 64 or a bias).
_PERSISTENT_HOPPER = (
    (128, 256, 64, 3, 8),
    (128, 128, 64, 4, 8),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
)


def persistent_configs() -> list[triton.Config]:
    """Configs of the persistent TMA variant: :data:`_PERSISTENT_HOPPER`."""
    return _gemm_configs(_PERSISTENT_HOPPER)


def persistent_scaled_configs() -> list[triton.Config]:
    """Configs of the persistent scaled-weight variant: :data:`_PERSISTENT_HOPPER` but the
    128×256 tile, which spills beside the weight tile held in registers (as
    :data:`_SCALED_HOPPER` leaves it out)."""
    return _gemm_configs(tuple(t for t in _PERSISTENT_HOPPER if t[:2] != (128, 256)))


# Output-tile elements per thread up to which the persistent variant hashes the noise of its
# Q tiles without spilling on sm_90 (128×128 tiles over 8 warps; 128×256 over 8 spill).
_NOISY_TILE_ELEMENTS_PER_THREAD = 64


def prune_noisy_tiles(configs, named_args, **kwargs) -> list[triton.Config]:
    """With ``FUSED_NOISE`` (at most 256 rows), the persistent configs whose accumulator
    leaves registers for the hash; all configs otherwise."""
    if not {**named_args, **kwargs}["FUSED_NOISE"]:  # the autotuner passes constexprs apart
        return configs
    return [
        config
        for config in configs
        if config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"]
        <= _NOISY_TILE_ELEMENTS_PER_THREAD * 32 * config.num_warps
    ]
