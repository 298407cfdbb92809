"""The LoRASC linear's forward and backward, written once over a backend's primitives.

Shapes: ``x`` (M, K), ``weight`` (N, K) (a float tensor or a
:class:`~lorasc_kernels.formats.scaled_weight.ScaledWeight`), ``bias`` (N,), ``lora_A`` (r, K),
``lora_B`` (N, r), ``dy`` (M, N). With ``s = spec.scale``, ``drop`` the LoRA-branch dropout
and ``W ⊕ n`` the weight with the call's fused noise:

* forward: ``xa = drop(x) Aᵀ`` (M, r), ``y = x (W ⊕ n)ᵀ + b + s · xa Bᵀ``; saves ``x``, ``xa``;
* backward: ``dY_B = dY B`` (M, r), ``dX = dY (W ⊕ n) + s · drop(dY_B A)``,
  ``dA = s · dY_Bᵀ drop(x)``, ``dB = s · dYᵀ xa``, ``dW = dYᵀ x``, ``db = Σ_m dY``.

With ``spec.compute == "fp8"`` (a scaled ``W``, ``docs/fp8.md``) the two big GEMMs run on fp8
operands, through the backend's :class:`~lorasc_kernels.backends.contract.ComputeBackend`
primitives: ``x`` is quantized per row in the pass that computes ``xa``, ``y = deq(x_q)
deq(W)ᵀ + b + s · xa Bᵀ``; ``dY ⊙ s_W`` (W's row scales on dY's columns) is quantized per
row in the pass that computes ``dY_B``, ``dX = deq(g_q) codes(W) + s · drop(dY_B A)``. ``dA``
and ``dB`` are the same products as without it (in ``x``'s dtype).

The GEMMs with an (M, N) or (M, K) output go to the backend's fused
:meth:`~lorasc_kernels.backends.contract.Backend.lowrank_gemm`; the thin products that need
the dropout mask to its ``dropout_lowrank`` primitives (the mask is regenerated from its
seed, never stored); the other thin and dense products are plain ``torch`` matmuls
(cuBLAS on a GPU: memory-bound reads of ``x`` or ``dY`` with an output of width r), the
factor ``s`` of ``dA`` and ``dB`` applied inside the GEMM (``addmm``'s ``alpha``, one
rounding, no extra pass). The host issues few ops: one fwd+bwd of a 2-D input without
dropout or noise is 9 aten ops and 2 fused-GEMM launches, plus one op per gradient the
autograd engine accumulates (``tests/test_host_path.py`` counts them); dX's GEMM takes
``W`` and ``A`` as stored and reads them transposed (a Python-made view costs ~1 µs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats.scaled_weight import ScaledWeight
from .contract import Backend
from .specs import LinearSpec

__all__ = ["linear_forward", "linear_backward"]


def _factors(lora_A, lora_B, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` in ``dtype``, in one call (each call costs host time at every step)."""
    if lora_A.dtype == dtype and lora_B.dtype == dtype:
        return lora_A, lora_B
    return lora_A.to(dtype), lora_B.to(dtype)


def linear_forward(
    backend: Backend,
    x: torch.Tensor,
    weight: torch.Tensor | ScaledWeight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    spec: LinearSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y (M, N), xa (M, r))`` in ``x``'s dtype; ``xa`` is saved for backward."""
    A, B = _factors(lora_A, lora_B, x.dtype)
    if spec.compute is not None:  # fp8: x quantized in the pass that computes xa
        rows, xa = backend.quantize_rows(x, None, A, spec.dropout)
        return backend.scaled_rows_gemm(rows, weight, bias, xa, B, spec.scale, x.dtype), xa
    if spec.dropout is None:  # x Aᵀ: the transpose taken in C++ (no Python call of .t())
        xa = F.linear(x, A)
    else:
        xa = backend.dropout_lowrank(x, A, spec.dropout)
    y = backend.lowrank_gemm(x, weight, bias, xa, B, spec.scale, noise=spec.noise)
    return y, xa


def linear_backward(
    backend: Backend,
    dy: torch.Tensor,
    x: torch.Tensor,
    xa: torch.Tensor,
    weight: torch.Tensor | ScaledWeight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    spec: LinearSpec,
    needs,
) -> tuple:
    """Gradients ``(dx, dweight, dbias, dlora_A, dlora_B)``, None where ``needs`` (five
    bools, in that order) is False; each in its input's dtype (``dbias`` in ``x``'s).
    A :class:`ScaledWeight` is frozen: ``needs`` asks no ``dweight``."""
    need_x, need_weight, need_bias, need_a, need_b = needs
    if dy.dtype != x.dtype:  # compared here: a call of .to alone costs ~1 µs of host time
        dy = dy.to(x.dtype)
    A, B = _factors(lora_A, lora_B, x.dtype)
    dx = d_a = None
    if need_x and spec.compute is not None:  # fp8: dY ⊙ s_W quantized in the pass for dY_B
        grads, dy_b = backend.quantize_rows(dy, weight.scale, B.t())
        dx = backend.scaled_rows_gemm(
            grads, weight, None, dy_b, A, spec.scale, x.dtype, True, spec.dropout
        )
    elif need_x or need_a:
        dy_b = dy @ B
    if need_x and dx is None:  # W and A as stored, read transposed (q_transposed)
        dx = backend.lowrank_gemm(
            dy,
            weight,
            None,
            dy_b,
            A,
            spec.scale,
            noise=spec.noise,
            q_transposed=True,
            rank_dropout=spec.dropout,
        )
    if need_a:
        if spec.dropout is None:  # s · dY_Bᵀ x, scaled in the GEMM (A: ignored, beta=0)
            d_a = torch.addmm(A, dy_b.t(), x, beta=0, alpha=spec.scale)
        else:
            d_a = backend.dropout_lowrank_grad(dy_b, x, spec.dropout, spec.scale)
        if d_a.dtype != lora_A.dtype:  # a cast A, or a float32 dropout_lowrank_grad
            d_a = d_a.to(lora_A.dtype)
    dweight = (dy.t() @ x).to(weight.dtype) if need_weight else None
    dbias = dy.sum(0) if need_bias else None
    d_b = None
    if need_b:  # s · dYᵀ xa, scaled in the GEMM (B: ignored, beta=0)
        d_b = torch.addmm(B, dy.t(), xa, beta=0, alpha=spec.scale)
        if d_b.dtype != lora_B.dtype:
            d_b = d_b.to(lora_B.dtype)
    return dx, dweight, dbias, d_a, d_b
