"""CUDA C++ backend: the kernels of ``csrc/`` as the primitives of
:class:`~lorasc_kernels.backends.contract.Backend`.

Shapes: ``p`` (M, K), ``q`` (N, K), ``u`` (M, r), ``v`` (N, r), ``x`` (M, K), ``lora_A`` (r, K).

The extension is loaded (or compiled, see :mod:`lorasc_kernels._build`) on first use,
never at import. Its ops, ``torch.ops.lorasc_cuda.*``:

* ``lowrank_gemm(p, q, bias, u, v, scale, <p transform>, <q transform>)``:
  ``p qᵀ + bias + scale · u vᵀ`` with an fp32 accumulator; a transform
  ``(kind, key, threshold, value, swap)`` adds the fused noise to, or drops out, each
  element of an operand as it is loaded, keyed by the element's (row, col), or by
  (col, row) when ``swap`` (a transposed view of ``W``);
* ``dropout(x, key, threshold, inv_keep)`` and ``merge_lowrank_(...)`` (in place).

The primitives map onto them: ``lowrank_gemm`` with the noise as ``q``'s transform (the
rank-term dropout, which sits on the product, is added after the GEMM);
``dropout_lowrank`` as the GEMM with the mask on ``x`` as loaded, ``dropout_lowrank_grad``
with the mask on ``xᵀ``, so ``drop(x)`` is never stored.
"""

from __future__ import annotations

import torch

from .._build import load_extension
from ..formats.registry import KERNEL_DTYPES
from ..formats.scaled_weight import ScaledWeight
from .specs import DropoutSpec, MergeSpec, NoiseSpec

__all__ = [
    "WEIGHT_DTYPES",
    "SCALED_WEIGHT_DTYPES",
    "TRANSFORM_NONE",
    "TRANSFORM_NOISE",
    "TRANSFORM_DROPOUT",
    "extension_ops",
    "unavailable_reason",
    "lowrank_gemm",
    "dropout_lowrank",
    "dropout_lowrank_grad",
    "merge_",
]

WEIGHT_DTYPES = KERNEL_DTYPES
# No scaled weight formats (fp8, csrc/lorasc/weight_types.h): functional.py refuses a
# ScaledWeight before a primitive is called, and the primitives refuse one too.
SCALED_WEIGHT_DTYPES: tuple[torch.dtype, ...] = ()

# Transform kinds of lowrank_gemm (csrc/lorasc/gemm_tile.cuh: TransformKind).
TRANSFORM_NONE, TRANSFORM_NOISE, TRANSFORM_DROPOUT = 0, 1, 2
_NO_TRANSFORM = (TRANSFORM_NONE, 0, 0, 0.0, False)
_NO_NOISE_KEY = -1  # merge_lowrank_'s "no noise" key

_ops = None
_load_error: str | None = None


def _register_fake_kernels():
    """Shape-only kernels of the ops, for torch.compile and opcheck."""

    @torch.library.register_fake("lorasc_cuda::lowrank_gemm")
    def _(
        p,
        q,
        bias,
        u,
        v,
        scale,
        p_kind,
        p_key,
        p_threshold,
        p_value,
        p_swap,
        q_kind,
        q_key,
        q_threshold,
        q_value,
        q_swap,
    ):
        return p.new_empty(p.shape[0], q.shape[0])

    @torch.library.register_fake("lorasc_cuda::dropout")
    def _(x, key, threshold, inv_keep):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("lorasc_cuda::merge_lowrank_")
    def _(
        weight,
        lora_B,
        lora_A,
        coeff,
        stochastic,
        rounding_key,
        remove_key,
        remove_scale,
        add_key,
        add_scale,
        row_offset,
    ):
        return None


def extension_ops(device: torch.device | None = None):
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
        extension_ops(device)
    except RuntimeError as error:
        return str(error)
    return None


def _noise_transform(noise: NoiseSpec | None, swap: bool) -> tuple:
    """``W + noise`` on load; ``swap`` when the operand is ``Wᵀ``."""
    if noise is None:
        return _NO_TRANSFORM
    return (TRANSFORM_NOISE, noise.key, 0, noise.scale, swap)


def _dropout_transform(dropout: DropoutSpec, swap: bool) -> tuple:
    """Dropout of ``x`` on load; ``swap`` when the operand is ``xᵀ``."""
    return (TRANSFORM_DROPOUT, dropout.key, dropout.threshold, dropout.keep_scale, swap)


def _gemm(
    p, q, bias=None, u=None, v=None, scale=1.0, p_transform=_NO_TRANSFORM, q_transform=_NO_TRANSFORM
):
    """``p qᵀ + bias + scale · u vᵀ`` (M, N) with transforms applied on load."""
    return extension_ops(p.device).lowrank_gemm(p, q, bias, u, v, scale, *p_transform, *q_transform)


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
) -> torch.Tensor:
    """``P (Q ⊕ noise)ᵀ (+ bias) + scale · drop(U Vᵀ)`` (M, N), with ``q_transposed``
    ``P (Q ⊕ noise) + scale · drop(U V)``; see the contract."""
    _refuse_scaled(q)
    if q_transposed:  # the kernels read Wᵀ and Aᵀ through the views' strides
        q, v = q.t(), None if v is None else v.t()
    noise_transform = _noise_transform(noise, q_transposed)
    bias = None if bias is None else bias.contiguous()
    if rank_dropout is None:
        return _gemm(p, q, bias, u, v, scale, q_transform=noise_transform)
    out = _gemm(p, q, bias, q_transform=noise_transform)
    if u is None:
        return out
    rank_term = extension_ops(p.device).dropout(
        u @ v.t(), rank_dropout.key, rank_dropout.threshold, rank_dropout.keep_scale
    )
    return out.add_(rank_term, alpha=scale)


def dropout_lowrank(x, lora_A, dropout: DropoutSpec) -> torch.Tensor:
    """``drop(x) Aᵀ`` (M, r): the GEMM with the mask applied to ``x`` as loaded."""
    return _gemm(x, lora_A, p_transform=_dropout_transform(dropout, False))


def dropout_lowrank_grad(grad, x, dropout: DropoutSpec, scale: float = 1.0) -> torch.Tensor:
    """``scale · Gᵀ drop(x)`` (r, K): the GEMM of ``Gᵀ`` and ``xᵀ``, the mask on ``xᵀ`` as
    loaded (the scale by one pass after it: the kernel's output is unscaled)."""
    if x.shape[0] == 0:  # the GEMM needs a nonempty reduction
        product = grad.t() @ x
    else:
        product = _gemm(grad.t(), x.t(), q_transform=_dropout_transform(dropout, True))
    return product if scale == 1.0 else product.mul_(scale)


def _noise_key(noise: NoiseSpec | None) -> tuple[int, float]:
    return (_NO_NOISE_KEY, 0.0) if noise is None else (noise.key, noise.scale)


def _refuse_scaled(weight) -> None:
    """The CUDA kernels have no scaled weight format (:data:`SCALED_WEIGHT_DTYPES` is empty)."""
    if isinstance(weight, ScaledWeight):
        raise TypeError(
            "the CUDA backend does not take scaled (fp8) weights; use backend='triton' or 'torch'"
        )


@torch.no_grad()
def merge_(weight, lora_B, lora_A, spec: MergeSpec) -> None:
    """``W ← round(W − remove + coeff · B A + add)`` in place, in one pass.

    Bit-identical to :func:`lorasc_kernels.backends.reference.merge_`.
    """
    _refuse_scaled(weight)
    if lora_A.dtype != lora_B.dtype:  # exact: the kernel upcasts both to float32 anyway
        lora_A, lora_B = lora_A.float(), lora_B.float()
    extension_ops(weight.device).merge_lowrank_(
        weight,
        lora_B,
        lora_A,
        spec.coeff,
        spec.stochastic,
        spec.rounding_key,
        *_noise_key(spec.remove),
        *_noise_key(spec.add),
        spec.row_offset,
    )
