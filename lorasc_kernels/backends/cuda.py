"""CUDA C++ backend: the kernels of ``csrc/`` behind the backend interface.

Shapes: ``x`` (M, K), ``weight`` (N, K), ``bias`` (N,), ``lora_A`` (r, K), ``lora_B`` (N, r).

The extension is loaded (or compiled, see :mod:`lorasc_kernels._build`) on first use,
never at import. Its ops, ``torch.ops.lorasc_cuda.*``:

* ``lowrank_gemm(p, q, bias, u, v, scale, <p transform>, <q transform>)``:
  ``p qᵀ + bias + scale · u vᵀ`` with an fp32 accumulator; a transform
  ``(kind, key, threshold, value, swap)`` adds the fused noise to, or drops out, each
  element of an operand as it is loaded, keyed by the element's (row, col), or by
  (col, row) when ``swap`` (a transposed view of ``W``).
* ``dropout(x, key, threshold, inv_keep)`` and ``merge_lowrank_(...)`` (in place).

:func:`linear_forward` / :func:`linear_backward` run under the package's autograd
(:class:`lorasc_kernels.ops.LinearFunction`, or the ``lorasc::`` ops under ``torch.compile``):
forward ``y = lowrank_gemm(x, W⊕noise, b, xa, B, s)`` with ``xa = drop(x) Aᵀ``; backward
``dX = lowrank_gemm(dY, (W⊕noise)ᵀ, dY_B, Aᵀ)`` with ``dY_B = s · dY B`` (without dropout;
with dropout the LoRA term ``drop(dY_B A)`` is added after the GEMM). The thin products run
on cuBLAS (``torch.matmul``), except those that need the dropout mask, which use the same
GEMM kernel with the mask applied on load, so ``drop(x)`` is never stored.
"""

from __future__ import annotations

import torch

from .. import noise as noise_lib
from .._build import load_extension
from .reference import dense_grads, dropout_threshold

__all__ = ["ops", "unavailable_reason", "linear_forward", "linear_backward", "merge_lowrank_"]

# Transform kinds of lowrank_gemm (csrc/lorasc/gemm_tile.cuh: TransformKind).
_NONE, _NOISE, _DROPOUT = 0, 1, 2
_NO_TRANSFORM = (_NONE, 0, 0, 0.0, False)
_NO_NOISE_KEY = -1  # merge_lowrank_'s "no noise" key

_ops = None
_load_error: str | None = None


def _register_fake_kernels():
    """Shape-only kernels of the ops, for torch.compile and opcheck."""

    @torch.library.register_fake("lorasc_cuda::lowrank_gemm")
    def _(p, q, bias, u, v, scale, p_kind, p_key, p_threshold, p_value, p_swap, q_kind, q_key,
          q_threshold, q_value, q_swap):
        return p.new_empty(p.shape[0], q.shape[0])

    @torch.library.register_fake("lorasc_cuda::dropout")
    def _(x, key, threshold, inv_keep):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("lorasc_cuda::merge_lowrank_")
    def _(weight, lora_B, lora_A, coeff, stochastic, rounding_key, remove_key, remove_scale,
          add_key, add_scale, row_offset):
        return None


def ops(device: torch.device | None = None):
    """``torch.ops.lorasc_cuda``, loading or building the extension the first time.

    Raises ``RuntimeError`` saying what is missing (and remembers it: no retry).
    """
    global _ops, _load_error
    if _ops is None:
        if _load_error is not None:
            raise RuntimeError(_load_error)
        try:
            load_extension(device)
        except (RuntimeError, OSError, ImportError) as error:
            _load_error = str(error)
            raise RuntimeError(_load_error) from error
        _register_fake_kernels()
        _ops = torch.ops.lorasc_cuda
    return _ops


def unavailable_reason(device) -> str | None:
    """None when the CUDA kernels can run on ``device``; else why not (may build first)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the CUDA backend needs CUDA tensors, got device {device}"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    try:
        ops(device)
    except RuntimeError as error:
        return str(error)
    return None


def _noise_transform(seed: int | None, scale: float, swap: bool) -> tuple:
    """``W + scale · noise(seed)`` on load; ``swap`` when the operand is ``Wᵀ``."""
    if seed is None or scale == 0.0:
        return _NO_TRANSFORM
    return (_NOISE, noise_lib.stream_key(seed, noise_lib.STREAM_NOISE), 0, scale, swap)


def _dropout_transform(p: float, seed: int, swap: bool) -> tuple:
    """Dropout of ``x`` on load; ``swap`` when the operand is ``xᵀ``."""
    key = noise_lib.stream_key(seed, noise_lib.STREAM_DROPOUT)
    return (_DROPOUT, key, dropout_threshold(p), 1.0 / (1.0 - p), swap)


def _gemm(p, q, bias=None, u=None, v=None, scale=1.0, p_transform=_NO_TRANSFORM,
          q_transform=_NO_TRANSFORM):
    """``p qᵀ + bias + scale · u vᵀ`` (M, N) with transforms applied on load."""
    return ops(p.device).lowrank_gemm(p, q, bias, u, v, scale, *p_transform, *q_transform)


def linear_forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed,
                   noise_seed, noise_scale):
    """``(y (M, N), xa (M, r))`` for 2-D ``x``; ``xa = drop(x) Aᵀ`` is saved for backward."""
    dtype = x.dtype
    A, B = lora_A.to(dtype), lora_B.to(dtype)
    if dropout_p > 0.0:
        xa = _gemm(x, A, p_transform=_dropout_transform(dropout_p, dropout_seed, False))
    else:
        xa = x @ A.t()
    bias = None if bias is None else bias.contiguous()
    y = _gemm(x, weight, bias, xa, B, scale,
              q_transform=_noise_transform(noise_seed, noise_scale, False))
    return y, xa


def linear_backward(dy, x, xa, weight, lora_A, lora_B, scale, dropout_p, dropout_seed,
                    noise_seed, noise_scale, needs):
    """Gradients ``(dx, dweight, dbias, dlora_A, dlora_B)``, None where ``needs`` (five
    bools, in that order) is False; the dropout mask and the noise are regenerated."""
    dtype = x.dtype
    dy = dy.to(dtype)
    A, B = lora_A.to(dtype), lora_B.to(dtype)
    need_x, need_w, need_b, need_a, need_bb = needs
    dx = d_a = None
    if need_x or need_a:
        dy_b = (dy @ B).mul_(scale)  # (M, r): s · dY B
    if need_x:
        noise = _noise_transform(noise_seed, noise_scale, True)
        if dropout_p > 0.0:  # the mask sits on the product: add it after the GEMM
            key = noise_lib.stream_key(dropout_seed, noise_lib.STREAM_DROPOUT)
            dx = _gemm(dy, weight.t(), q_transform=noise)
            dx.add_(ops(dy.device).dropout(dy_b @ A, key, dropout_threshold(dropout_p),
                                           1.0 / (1.0 - dropout_p)))
        else:
            dx = _gemm(dy, weight.t(), None, dy_b, A.t(), 1.0, q_transform=noise)
    if need_a:
        if dropout_p > 0.0 and x.shape[0] > 0:  # dY_Bᵀ · drop(x), the mask on xᵀ as loaded
            d_a = _gemm(dy_b.t(), x.t(),
                        q_transform=_dropout_transform(dropout_p, dropout_seed, True))
        else:
            d_a = dy_b.t() @ x
        d_a = d_a.to(lora_A.dtype)
    dw, dbias, d_b = dense_grads(dy, x, xa, weight, lora_B, scale, need_w, need_b, need_bb)
    return dx, dw, dbias, d_a, d_b


def _noise_key(pair: tuple[int, float] | None) -> tuple[int, float]:
    if pair is None:
        return _NO_NOISE_KEY, 0.0
    return noise_lib.stream_key(pair[0], noise_lib.STREAM_NOISE), pair[1]


@torch.no_grad()
def merge_lowrank_(weight, lora_B, lora_A, coeff, rounding, seed, noise_remove, noise_add,
                   row_offset):
    """``W ← round(W − noise_remove + coeff · B A + noise_add)`` in place, in one pass.

    Bit-identical to :func:`lorasc_kernels.backends.reference.merge_lowrank_`.
    """
    if lora_A.dtype != lora_B.dtype:  # exact: the kernel upcasts both to float32 anyway
        lora_A, lora_B = lora_A.float(), lora_B.float()
    ops(weight.device).merge_lowrank_(
        weight, lora_B, lora_A, coeff, rounding == "stochastic",
        noise_lib.stream_key(seed, noise_lib.STREAM_ROUNDING), *_noise_key(noise_remove),
        *_noise_key(noise_add), row_offset,
    )
    return weight
