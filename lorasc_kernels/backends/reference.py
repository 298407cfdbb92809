"""Pure-torch backend: the oracle every kernel is tested against, and the CPU path.

It implements the primitives of :class:`~lorasc_kernels.backends.contract.Backend` in
plain torch; :mod:`lorasc_kernels.backends.composition` builds the linear's forward and backward
from them, as for every backend. Shapes: ``p`` (M, K), ``q`` (N, K), ``u`` (M, r), ``v``
(N, r), ``x`` (M, K), ``lora_A`` (r, K), ``weight`` (N, K).

The functions here define the bits every kernel reproduces: :func:`noisy_weight` (the fused
cascade noise), :func:`apply_dropout` (the LoRA-branch dropout) and :func:`merge_` (the
exact order of float32 operations of a merge, see its docstring).
"""

from __future__ import annotations

import torch

from .. import noise as noise_lib
from ..formats.quantize import quantize_rows as quantize_values
from ..formats.registry import REFERENCE_DTYPES, SCALED_DTYPES, float32_scalar, weight_dtype
from ..formats.rounding import rescale_rows, round_from_fp32, round_to_scaled
from ..formats.scaled_weight import ScaledWeight
from .specs import DropoutSpec, MergeSpec, NoiseSpec

__all__ = [
    "WEIGHT_DTYPES",
    "SCALED_WEIGHT_DTYPES",
    "COMPUTE_MODES",
    "dropout_keep_mask",
    "apply_dropout",
    "noisy_weight",
    "unavailable_reason",
    "lowrank_gemm",
    "dropout_lowrank",
    "dropout_lowrank_grad",
    "quantize_rows",
    "scaled_rows_gemm",
    "lowrank_delta_fp32",
    "exact_products",
    "merge_",
    "merge_scaled_",
]

WEIGHT_DTYPES = REFERENCE_DTYPES
SCALED_WEIGHT_DTYPES = SCALED_DTYPES
COMPUTE_MODES = ("fp8",)

# Elements of W processed at a time by the merge: bounds its temporaries (float32 values and
# int64 hash bits, ~56 bytes per element: 3.5 MiB in all), which also keeps them in cache.
MERGE_BLOCK_ELEMENTS = 1 << 16


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean keep-mask of the LoRA-branch dropout for an ``(rows, cols)`` input."""
    dropout = DropoutSpec(seed, p)
    bits = noise_lib.hash_bits(dropout.key, rows, cols, device=device)
    return (bits >> 8) >= dropout.threshold


def apply_dropout(x: torch.Tensor, p: float, seed: int | None) -> torch.Tensor:
    """``drop(x)`` for 2-D ``x``: kept entries scaled by ``1/(1-p)``; ``x`` itself if ``p == 0``."""
    if p == 0.0:
        return x
    keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], p, device=x.device)
    return torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros((), dtype=x.dtype, device=x.device))


def noisy_weight(weight: torch.Tensor, seed: int | None, scale: float) -> torch.Tensor:
    """``round(W + scale · noise(seed))`` in W's dtype (a new tensor), or ``W`` if no noise.

    In float32: ``(float32(W) + float32(scale) * u).to(W.dtype)``, the bits every kernel
    reproduces; a float64 ``W`` (the oracle for gradcheck) gets the sum in float64.
    """
    if seed is None or scale == 0.0:
        return weight
    u = noise_lib.noise(seed, weight.shape[0], weight.shape[1], device=weight.device)
    if weight.dtype == torch.float64:  # the float64 oracle: no float32 rounding
        return weight + scale * u.double()
    return (weight.to(torch.float32) + float32_scalar(scale) * u).to(weight.dtype)


def unavailable_reason(device: torch.device) -> None:
    """The torch backend runs wherever torch does."""
    return None


def lowrank_gemm(
    p,
    q,
    bias,
    u,
    v,
    scale,
    noise: NoiseSpec | None = None,
    q_transposed: bool = False,
    rank_dropout: DropoutSpec | None = None,
):
    """``P (Q ⊕ noise)ᵀ (+ bias) + scale · drop(U Vᵀ)`` (M, N), with ``q_transposed``
    ``P (Q ⊕ noise) + scale · drop(U V)``; see the contract.

    A :class:`ScaledWeight` ``q`` is dequantized in float32 and the whole sum computed in
    float32, rounded once to ``p``'s dtype.
    """
    if isinstance(q, ScaledWeight):
        out = lowrank_gemm(
            p.float(),
            q.dequantize(torch.float32),
            None if bias is None else bias.float(),
            None if u is None else u.float(),
            None if v is None else v.float(),
            scale,
            q_transposed=q_transposed,
            rank_dropout=rank_dropout,
        )
        return out.to(p.dtype)
    if noise is not None:
        q = noisy_weight(q, noise.seed, noise.scale)
    q_t = q if q_transposed else q.t()  # the GEMM's (K, N) operand
    out = p @ q_t if bias is None else torch.addmm(bias, p, q_t)
    if u is None:
        return out
    v_t = v if q_transposed else v.t()  # (r, N)
    if rank_dropout is None:
        return out.addmm_(u, v_t, alpha=scale)  # accumulated in place: no (M, N) temporary
    return out.add_(apply_dropout(u @ v_t, rank_dropout.p, rank_dropout.seed), alpha=scale)


def dropout_lowrank(x, lora_A, dropout: DropoutSpec):
    """``drop(x) Aᵀ`` (M, r)."""
    return apply_dropout(x, dropout.p, dropout.seed) @ lora_A.t()


def dropout_lowrank_grad(grad, x, dropout: DropoutSpec, scale: float = 1.0):
    """``scale · Gᵀ drop(x)`` (r, K) in ``x``'s dtype."""
    product = grad.t() @ apply_dropout(x, dropout.p, dropout.seed)
    return product if scale == 1.0 else product.mul_(scale)


def quantize_rows(p, col_scale=None, lowrank=None, dropout: DropoutSpec | None = None):
    """``(rows, pl)``: ``rows`` a :class:`ScaledWeight` (M, K) of ``p`` (M, K) in the
    activation format (:func:`~lorasc_kernels.formats.quantize.quantize_rows`: per-row absmax
    scales, round to nearest), ``p`` first times ``col_scale`` (K,) per column in float32;
    ``pl = drop(p) lowrankᵀ`` (M, r) in ``p``'s dtype for ``lowrank`` (r, K), else None."""
    values = p.float() if col_scale is None else p.float() * col_scale[None, :]
    pl = None
    if lowrank is not None:
        pl = apply_dropout(p, dropout.p, dropout.seed) if dropout is not None else p
        pl = pl @ lowrank.t()
    return quantize_values(values), pl


def scaled_rows_gemm(
    a, weight, bias, u, v, scale, out_dtype, q_transposed: bool = False, rank_dropout=None
):
    """The fp8 compute mode's GEMM (M, N) in ``out_dtype``, in float32 on the dequantized
    operands, rounded once: forward ``deq(a) deq(W)ᵀ (+ bias) + scale · U Vᵀ`` for ``a`` (M, K)
    and ``weight`` W (N, K); with ``q_transposed`` (dX) ``deq(a) codes(W) + scale · drop(U
    V)``, W's row scales having been folded into ``a`` (:func:`quantize_rows`'s
    ``col_scale``)."""
    codes = weight.codes.float() if q_transposed else weight.dequantize(torch.float32)
    out = lowrank_gemm(
        a.dequantize(torch.float32),
        codes,
        None if bias is None else bias.float(),
        None if u is None else u.float(),
        None if v is None else v.float(),
        scale,
        q_transposed=q_transposed,
        rank_dropout=rank_dropout,
    )
    return out.to(out_dtype)


def lowrank_delta_fp32(
    lora_B: torch.Tensor, lora_A: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``B A`` in float32, summed over the rank in order: ``d = 0; d = d + B[:, k] A[k, :]``.

    Each step rounds the product and the sum separately, except when both factors have one
    16-bit dtype (:func:`exact_products`): their product is then exact, and the step rounds
    once, as a fused multiply-add does (an FMA on the GPU, one instruction instead of two).
    The two differ only where a product falls below float32's normal range. This exact
    order is what the merge kernels reproduce, so every backend gets the same bits.
    ``dtype=torch.float64``: the same sum in float64 (the merge of a float64 ``W``).
    """
    fused = dtype == torch.float32 and exact_products(lora_B.dtype, lora_A.dtype)
    b = lora_B.to(torch.float64 if fused else dtype)
    a = lora_A.to(torch.float64 if fused else dtype)
    delta = torch.zeros(b.shape[0], a.shape[1], dtype=dtype, device=b.device)
    for k in range(a.shape[0]):
        product = b[:, k : k + 1] * a[k : k + 1, :]
        if fused:  # exact product, sum rounded to float64 then to float32: one rounding
            delta = product.add_(delta).float()  # (53 >= 2·24 + 2 bits)
        else:
            delta = delta + product
    return delta


def exact_products(b_dtype: torch.dtype, a_dtype: torch.dtype) -> bool:
    """Whether the merge's factors ``B`` and ``A`` share a 16-bit dtype, so that each product
    ``B[i, k] A[k, j]`` (at most 22 significant bits) is exact: the rank step then rounds
    once (:func:`lowrank_delta_fp32`)."""
    return b_dtype == a_dtype and b_dtype in (torch.bfloat16, torch.float16)


def _merged_rows(value, lora_B, lora_A, spec: MergeSpec, global_start: int):
    """``value − remove + coeff · B A + add`` for rows from ``global_start``, in ``value``'s
    dtype: float32 (scalars rounded to float32), or float64 (a float64 ``W``, unrounded)."""
    rows, cols = value.shape
    dtype = value.dtype
    scalar = float if dtype == torch.float64 else float32_scalar
    if spec.remove is not None:
        u = noise_lib.noise(spec.remove.seed, rows, cols, global_start, value.device)
        value = value - scalar(spec.remove.scale) * u.to(dtype)
    value = value + scalar(spec.coeff) * lowrank_delta_fp32(lora_B, lora_A, dtype)
    if spec.add is not None:
        u = noise_lib.noise(spec.add.seed, rows, cols, global_start, value.device)
        value = value + scalar(spec.add.scale) * u.to(dtype)
    return value


def _rounding_bits(spec: MergeSpec, rows: int, cols: int, global_start: int, device, dtype=None):
    """The stochastic-rounding bits of rows from ``global_start``, or None for nearest and
    for a float ``dtype`` that keeps every float32 bit (float32, float64: nothing is
    rounded, so the hash, most of a CPU merge, is not drawn); ``dtype`` None: a scaled
    format, which always rounds."""
    if not spec.stochastic or (dtype is not None and weight_dtype(dtype).dropped_bits == 0):
        return None
    return noise_lib.hash_bits(spec.rounding_key, rows, cols, global_start, device=device)


@torch.no_grad()
def merge_(weight, lora_B, lora_A, spec: MergeSpec) -> None:
    """``W ← round(W − remove + coeff · B A + add)`` in place, by row blocks.

    Per element, in float32, in this order (``u_*`` from :func:`noise.noise`)::

        v = float32(W)
        v = v - s_remove * u_remove        # if spec.remove = NoiseSpec(seed_remove, s_remove)
        v = v + coeff * delta              # delta from lowrank_delta_fp32
        v = v + s_add * u_add              # if spec.add = NoiseSpec(seed_add, s_add)
        W = round_from_fp32(v, W.dtype, rounding, bits(seed, STREAM_ROUNDING))

    Scalars are rounded to float32 first. Rows are global rows ``row_offset + i``. A float64
    ``W`` (torch backend only; the kernels refuse it) is merged in float64 instead, scalars
    unrounded, so it loses nothing to float32.
    A :class:`ScaledWeight` goes through :func:`merge_scaled_`.
    Arguments are validated by :func:`lorasc_kernels.merge.merge_lowrank_`.
    """
    if isinstance(weight, ScaledWeight):
        merge_scaled_(weight, lora_B, lora_A, spec)
        return
    rows, cols = weight.shape
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    block = max(1, MERGE_BLOCK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        global_start = spec.row_offset + start
        value = _merged_rows(
            weight[start:stop].to(compute), lora_B[start:stop], lora_A, spec, global_start
        )
        bits = _rounding_bits(spec, stop - start, cols, global_start, weight.device, weight.dtype)
        weight[start:stop] = round_from_fp32(value, weight.dtype, spec.rounding, bits)


@torch.no_grad()
def merge_scaled_(weight: ScaledWeight, lora_B, lora_A, spec: MergeSpec) -> None:
    """The merge into a scaled ``W = scale[row] · codes``, codes and scales in place.

    Per row, in float32, in this order::

        v = scale[i] * float32(codes[i])                 # dequantized row
        v = (remove, coeff · B A, add as in merge_)      # _merged_rows
        y = v / scale[i]                                 # IEEE division
        y, scale[i] = rescale_rows(y, scale[i], max_value)     # if max|y| > max_value
        codes[i] = round_to_scaled(y, codes.dtype, rounding, bits(seed, STREAM_ROUNDING))

    A row whose values would exceed the format's range gets a scale larger by the smallest
    power of two that fits them (never a clamp); the other rows keep their scale.
    """
    codes, row_scale = weight.codes, weight.scale
    max_value = weight.format.max_value
    rows, cols = weight.shape
    block = max(1, MERGE_BLOCK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        global_start = spec.row_offset + start
        scale = row_scale[start:stop]
        value = codes[start:stop].to(torch.float32) * scale[:, None]
        value = _merged_rows(value, lora_B[start:stop], lora_A, spec, global_start)
        value, scale = rescale_rows(value / scale[:, None], scale, max_value)
        bits = _rounding_bits(spec, stop - start, cols, global_start, weight.device)
        codes[start:stop] = round_to_scaled(value, codes.dtype, spec.rounding, bits)
        row_scale[start:stop] = scale
