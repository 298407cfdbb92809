"""Pure-torch backend: the oracle every kernel is tested against, and the CPU path.

Shapes: ``x`` (M, K), ``weight`` (N, K), ``bias`` (N,), ``lora_A`` (r, K), ``lora_B`` (N, r).

The forward computes ``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` where ``W`` may carry the
fused cascade noise ``noise_scale · noise(noise_seed)`` for this call only. It saves
``x`` and ``xa = drop(x) Aᵀ`` (plus the parameters, which are not copies); the dropout mask
and the noisy weight are regenerated from their seeds in backward.

:func:`merge_lowrank_` defines the exact order of float32 operations that every merge
kernel reproduces bit for bit (see its docstring).
"""

from __future__ import annotations

import torch

from .. import noise as noise_lib
from ..rounding import round_from_fp32

__all__ = [
    "dropout_keep_mask",
    "dropout_threshold",
    "apply_dropout",
    "noisy_weight",
    "linear_forward",
    "linear_backward",
    "dense_grads",
    "unavailable_reason",
    "lowrank_delta_fp32",
    "merge_lowrank_",
]

# Elements of W processed at a time by the merge: bounds its temporaries (float32 values and
# int64 hash bits, ~56 bytes per element: 3.5 MiB in all), which also keeps them in cache.
MERGE_BLOCK_ELEMENTS = 1 << 16


def dropout_threshold(p: float) -> int:
    """Integer threshold on ``bits >> 8``: an element is kept iff ``(bits >> 8) >= threshold``."""
    return int(p * (1 << 24))


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean keep-mask of the LoRA-branch dropout for an ``(rows, cols)`` input."""
    key = noise_lib.stream_key(seed, noise_lib.STREAM_DROPOUT)
    bits = noise_lib.hash_bits(key, rows, cols, device=device)
    return (bits >> 8) >= dropout_threshold(p)


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
    return (weight.to(torch.float32) + _fp32(scale) * u).to(weight.dtype)


def linear_forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed,
                   noise_seed, noise_scale):
    """``(y (M, N), xa (M, r))`` for 2-D ``x``; ``xa = drop(x) Aᵀ`` is saved for backward."""
    dtype = x.dtype
    A, B = lora_A.to(dtype), lora_B.to(dtype)
    w = noisy_weight(weight, noise_seed, noise_scale)
    xa = apply_dropout(x, dropout_p, dropout_seed) @ A.t()
    y = x @ w.t() if bias is None else torch.addmm(bias.to(dtype), x, w.t())
    y.addmm_(xa, B.t(), alpha=scale)
    return y, xa


def dense_grads(dy, x, xa, weight, lora_B, scale, need_weight, need_bias, need_lora_B):
    """``(dweight, dbias, dlora_B)``, None where not needed: the backward's plain matmuls,
    shared by every backend. ``dy`` (M, N) and ``x`` (M, K) in the compute dtype."""
    dweight = (dy.t() @ x).to(weight.dtype) if need_weight else None
    dbias = dy.sum(0) if need_bias else None
    dlora_b = (dy.t() @ xa).mul_(scale).to(lora_B.dtype) if need_lora_B else None
    return dweight, dbias, dlora_b


def linear_backward(dy, x, xa, weight, lora_A, lora_B, scale, dropout_p, dropout_seed,
                    noise_seed, noise_scale, needs):
    """Gradients ``(dx, dweight, dbias, dlora_A, dlora_B)``, None where ``needs`` (five
    bools, in that order) is False; ``dbias`` is in ``x``'s dtype, which is the bias's."""
    need_x, need_w, need_b, need_a, need_bb = needs
    dtype = x.dtype
    dy = dy.to(dtype)
    A, B = lora_A.to(dtype), lora_B.to(dtype)
    dx = d_a = None
    if need_x or need_a:
        dy_b = (dy @ B).mul_(scale)  # (M, r): s · dY B
    if need_x:
        dx = dy @ noisy_weight(weight, noise_seed, noise_scale)
        if dropout_p > 0.0:
            dx.add_(apply_dropout(dy_b @ A, dropout_p, dropout_seed))
        else:
            dx.addmm_(dy_b, A)  # accumulated in place: no (M, K) temporary
    if need_a:
        d_a = (dy_b.t() @ apply_dropout(x, dropout_p, dropout_seed)).to(lora_A.dtype)
    dw, dbias, d_b = dense_grads(dy, x, xa, weight, lora_B, scale, need_w, need_b, need_bb)
    return dx, dw, dbias, d_a, d_b


def unavailable_reason(device: torch.device) -> None:
    """The torch backend runs wherever torch does."""
    return None


def lowrank_delta_fp32(lora_B: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
    """``B A`` in float32, summed over the rank in order: ``d = 0; d = d + B[:, k] A[k, :]``.

    This exact order (separate multiply and add, no fused multiply-add) is what the
    merge kernels reproduce, so every backend gets the same bits.
    """
    b = lora_B.to(torch.float32)
    a = lora_A.to(torch.float32)
    delta = torch.zeros(b.shape[0], a.shape[1], dtype=torch.float32, device=b.device)
    for k in range(a.shape[0]):
        delta = delta + b[:, k : k + 1] * a[k : k + 1, :]
    return delta


def _fp32(value: float) -> float:
    """``value`` rounded to the nearest float32 (kernels receive float32 scalars)."""
    return float(torch.tensor(value, dtype=torch.float32))


@torch.no_grad()
def merge_lowrank_(weight, lora_B, lora_A, coeff, rounding, seed, noise_remove, noise_add,
                   row_offset):
    """``W ← round(W − noise_remove + coeff · B A + noise_add)`` in place, by row blocks.

    Per element, in float32, in this order (``u_*`` from :func:`noise.noise`)::

        v = float32(W)
        v = v - s_remove * u_remove        # if noise_remove = (seed_remove, s_remove)
        v = v + coeff * delta              # delta from lowrank_delta_fp32
        v = v + s_add * u_add              # if noise_add = (seed_add, s_add)
        W = round_from_fp32(v, W.dtype, rounding, bits(seed, STREAM_ROUNDING))

    Scalars are rounded to float32 first. Rows are global rows ``row_offset + i``. A float64
    ``W`` (torch backend only) goes through the same float32 arithmetic, like every kernel.
    Arguments are validated by :func:`lorasc_kernels.functional.merge_lowrank_`.
    """
    rows, cols = weight.shape
    block = max(1, MERGE_BLOCK_ELEMENTS // max(cols, 1))
    coeff32 = _fp32(coeff)
    rounding_key = noise_lib.stream_key(seed, noise_lib.STREAM_ROUNDING)
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        global_start = row_offset + start
        value = weight[start:stop].to(torch.float32)
        if noise_remove is not None:
            u = noise_lib.noise(noise_remove[0], stop - start, cols, global_start, weight.device)
            value = value - _fp32(noise_remove[1]) * u
        value = value + coeff32 * lowrank_delta_fp32(lora_B[start:stop], lora_A)
        if noise_add is not None:
            u = noise_lib.noise(noise_add[0], stop - start, cols, global_start, weight.device)
            value = value + _fp32(noise_add[1]) * u
        bits = None
        if rounding == "stochastic":
            bits = noise_lib.hash_bits(rounding_key, stop - start, cols, global_start,
                                       device=weight.device)
        weight[start:stop] = round_from_fp32(value, weight.dtype, rounding, bits)
    return weight
