"""The backend contract: the primitives a backend supplies, as a :class:`typing.Protocol`.

A backend is a module that satisfies :class:`Backend`. The LoRASC linear's forward and
backward are written once over these primitives (:mod:`lorasc_kernels.backends.composition`); a
backend implements the primitives only. Arguments arrive validated
(:mod:`lorasc_kernels.functional`): 2-D tensors of one device, dtypes in the backend's
:attr:`~Backend.WEIGHT_DTYPES`, specs from :mod:`lorasc_kernels.backends.specs`.

The torch backend (:mod:`.reference`) implements them in plain torch and is the oracle:
noise, dropout masks and merges must match it bit for bit; GEMMs within the tolerances of
``docs/design.md``. ``tests/backends/test_backend_contract.py`` checks every registered backend.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..formats.scaled_weight import ScaledWeight
from .specs import DropoutSpec, MergeSpec, NoiseSpec

__all__ = ["Backend", "PRIMITIVES", "ComputeBackend", "COMPUTE_PRIMITIVES"]

PRIMITIVES = (
    "unavailable_reason",
    "lowrank_gemm",
    "dropout_lowrank",
    "dropout_lowrank_grad",
    "merge_",
)
# The fp8 compute mode's primitives (:class:`ComputeBackend`): optional, a backend without
# them has no compute mode (refused by name before anything runs).
COMPUTE_PRIMITIVES = ("quantize_rows", "scaled_rows_gemm")


@runtime_checkable
class Backend(Protocol):
    """What a backend module defines. Shapes: ``p`` (M, K), ``q`` (N, K), ``u`` (M, r),
    ``v`` (N, r), ``bias`` (N,), ``x`` (M, K), ``lora_A`` (r, K), ``weight`` (N, K)."""

    WEIGHT_DTYPES: tuple[torch.dtype, ...]
    """The weight (and input) dtypes the backend's kernels take."""

    SCALED_WEIGHT_DTYPES: tuple[torch.dtype, ...]
    """The scaled weight formats (:data:`lorasc_kernels.formats.registry.SCALED_WEIGHT_DTYPES`) its
    ``lowrank_gemm`` and ``merge_`` take as a :class:`ScaledWeight`; empty if none."""

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when the backend can run on ``device``; else why not, in words."""

    def lowrank_gemm(
        self,
        p: torch.Tensor,
        q: torch.Tensor | ScaledWeight,
        bias: torch.Tensor | None,
        u: torch.Tensor | None,
        v: torch.Tensor | None,
        scale: float,
        noise: NoiseSpec | None = None,
        q_transposed: bool = False,
        rank_dropout: DropoutSpec | None = None,
    ) -> torch.Tensor:
        """``P (Q ⊕ noise)ᵀ (+ bias) + scale · drop(U Vᵀ)`` (M, N) in ``p``'s dtype; with
        ``q_transposed`` (backward's dX) ``P (Q ⊕ noise) + scale · drop(U V)``.

        ``q`` is the weight ``W`` as stored in both orientations: (N, K), or with
        ``q_transposed`` (K, N), read transposed through its strides (no view, no copy);
        ``v`` likewise: (N, r), or with ``q_transposed`` (r, N) (the factor as stored:
        ``B`` forward, ``A`` for dX; a view per call costs ~1 µs of host time). ``noise`` is
        keyed by ``W``'s (row, col): ``Q ⊕ noise`` is
        :func:`~lorasc_kernels.backends.reference.noisy_weight` of ``W``. ``rank_dropout``
        masks the rank term's ``(m, n)`` entries (``m < M``, ``n < N``). ``u``/``v`` None:
        no rank term. Any strides. A scaled ``W`` (format in :attr:`SCALED_WEIGHT_DTYPES`,
        no noise) is a :class:`ScaledWeight`, the same in both orientations (with
        ``q_transposed`` its scale runs along ``K``).
        """

    def dropout_lowrank(
        self, x: torch.Tensor, lora_A: torch.Tensor, dropout: DropoutSpec
    ) -> torch.Tensor:
        """``drop(x) Aᵀ`` (M, r) in ``x``'s dtype, the mask regenerated, never stored."""

    def dropout_lowrank_grad(
        self, grad: torch.Tensor, x: torch.Tensor, dropout: DropoutSpec, scale: float = 1.0
    ) -> torch.Tensor:
        """``scale · Gᵀ drop(x)`` (r, K) for ``G = grad`` (M, r), in float32 or ``x``'s
        dtype (the scale applied by the GEMM: no pass of its own)."""

    def merge_(
        self,
        weight: torch.Tensor | ScaledWeight,
        lora_B: torch.Tensor,
        lora_A: torch.Tensor,
        spec: MergeSpec,
    ) -> None:
        """``W ← round(W − remove + coeff · B A + add)`` in place, bit-identical to the
        reference; ``weight`` (rows, K) is a block of rows from ``spec.row_offset`` on.
        A :class:`ScaledWeight` has its codes and scales both updated
        (:func:`~lorasc_kernels.backends.reference.merge_scaled_`)."""


@runtime_checkable
class ComputeBackend(Protocol):
    """The primitives of the fp8 compute mode (``docs/fp8.md``), beside :class:`Backend`'s:
    activations and gradients quantized per row into
    :data:`~lorasc_kernels.formats.registry.ACTIVATION_FORMAT`, GEMMs on two fp8 operands.
    The reference emulates them exactly (quantize, dequantize, float32 matmul): the codes
    and scales of :meth:`quantize_rows` bit for bit, the GEMMs within float32's summation
    order. Shapes: ``p`` (M, K), ``lowrank`` (r, K), ``a`` (M, K), ``weight`` (N, K), ``u``
    (M, r), ``v`` (N, r) (dX: ``v`` is ``A`` (r, K), as :meth:`Backend.lowrank_gemm` takes it)."""

    COMPUTE_MODES: tuple[str, ...]
    """The compute modes it runs (``("fp8",)``); a backend without the attribute has none."""

    def quantize_rows(
        self,
        p: torch.Tensor,
        col_scale: torch.Tensor | None = None,
        lowrank: torch.Tensor | None = None,
        dropout: DropoutSpec | None = None,
    ) -> tuple[ScaledWeight, torch.Tensor | None]:
        """``(rows, pl)``: ``rows`` the :class:`ScaledWeight` (M, K) of ``p · diag(col_scale)``
        (float32 products) with per-row absmax scales, rounded to nearest; ``pl = drop(p)
        lowrankᵀ`` (M, r) in ``p``'s dtype from the same read of ``p``, or None."""

    def scaled_rows_gemm(
        self,
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
        """(M, N) in ``out_dtype``: ``deq(a) deq(W)ᵀ (+ bias) + scale · U Vᵀ``; with
        ``q_transposed`` (backward's dX, N = W's columns) ``deq(a) codes(W) + scale · drop(U
        V)``, W's row scales folded into ``a``'s columns before it was quantized."""
