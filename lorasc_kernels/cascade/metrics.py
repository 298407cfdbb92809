"""What a :class:`~lorasc_kernels.Cascade` reports about each boundary (``last_boundary``).

Every boundary reports its index and the time of its merges (read when the figures are
first read: a boundary itself does not wait for the GPU); every ``every``-th boundary
(the first included) also measures ONE layer, ``layer`` (the Cascade's first by default):

* ``lorasc/update_ratio``: ``‖ΔW_t‖_F / ‖W‖_F``, ``ΔW_t = slow_rate·s·B_t A_t`` the update
  merged at this boundary and ``W`` the weight it was merged into, as stored (with the
  in-place noise; dequantized for fp8);
* ``lorasc/cascade_effective_rank``: the effective rank of ``ΔW_t`` (at most r);
* ``lorasc/effective_rank`` (with ``keep_history`` only): the effective rank of the update
  accumulated over the run, ``Σ_{τ≤t} ΔW_τ`` (at most r·(t+1)).

The effective rank is Roy & Vetterli's (:func:`~lorasc_kernels.cascade.lowrank.effective_rank`).
A measured boundary costs one read of the layer's ``W``, an SVD of its update's factors,
``O((N + K)·r²)``, and, with the history, the update accumulated since the last measured
boundary added to a :class:`~lorasc_kernels.cascade.lowrank.LowRankSum` (``O((N + K)·p·r)`` per
cascade, ``p ≤ min(r·(t+1), N, K)``) and the singular values of its core
(``O(p³)``, at most those of a dense ``min(N, K)``-sided SVD however long the run).
Boundaries not measured cost nothing. The default is every :data:`DEFAULT_EVERY`-th
boundary.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.distributed as dist

from .. import _checks as checks
from ..distributed import full_tensor, is_dtensor, local_row_block
from .lowrank import LowRankSum, effective_rank, lowrank_svd

__all__ = ["DEFAULT_EVERY", "BoundaryMetrics"]

# The default spacing of measured boundaries: a measured one on a 4096² layer costs
# seconds once its accumulated rank nears 4096 (docs/benchmarks.md, bench_scaling).
DEFAULT_EVERY = 10


class BoundaryMetrics:
    """Which boundaries and which layer are measured, and the figures of the last one."""

    def __init__(self, layer_names: list[str]):
        self.layer_names = layer_names
        self.every = DEFAULT_EVERY
        self.layer = layer_names[0]
        # The measured layer's accumulated update: (a weak reference to the history it was
        # read from, so that a replaced history is not kept alive; its sum).
        self._accumulated: tuple[weakref.ref, LowRankSum] | None = None
        self._last: dict[str, float] = {}
        self._merge_ms = None  # the last boundary's merge time, until first read (lazy)

    def configure(self, every: int, layer: str | None) -> None:
        """Measure every ``every``-th boundary (0: none) on ``layer`` (None: the first)."""
        every = checks.check_int("every", every, 0)
        if layer is not None and layer not in self.layer_names:
            raise ValueError(
                f"layer {layer!r} is not one of the Cascade's LoRASCLinear "
                f"layers {self.layer_names}"
            )
        self.every = every
        self.layer = self.layer_names[0] if layer is None else layer

    def sample(self, cascade_index: int, layer, coeff: float):
        """Before the merge of boundary ``cascade_index``: ``(c·B, A, ‖W‖_F)`` of the measured
        layer (``layer``, its module), or None if this boundary is not measured."""
        if self.every == 0 or cascade_index % self.every:
            return None
        lora_b = full_tensor(layer.lora_B.detach()).to("cpu", torch.float64) * coeff
        lora_a = full_tensor(layer.lora_A.detach()).to("cpu", torch.float64)
        return lora_b, lora_a, _weight_norm(layer)

    def record(self, cascade_index: int, merge_ms, sample, history: list) -> None:
        """The figures of boundary ``cascade_index``; ``merge_ms()`` gives the time of its
        merges when :attr:`last` is first read (on a GPU, that read waits for them);
        ``history``: the measured layer's kept ``(c·B_τ, A_τ)`` (empty without
        ``keep_history``)."""
        figures = {"lorasc/cascade": cascade_index, "lorasc/merge_ms": math.nan}
        if sample is not None:
            lora_b, lora_a, weight_norm = sample
            singular = lowrank_svd(lora_b, lora_a)[1]
            update_norm = float(singular.square().sum().sqrt())
            figures["lorasc/update_ratio"] = (
                update_norm / weight_norm if weight_norm > 0 else math.inf
            )
            figures["lorasc/cascade_effective_rank"] = effective_rank(singular)
            if history:
                figures["lorasc/effective_rank"] = effective_rank(
                    self._accumulated_sum(history).singular_values()
                )
        self._last, self._merge_ms = figures, merge_ms

    def _accumulated_sum(self, history) -> LowRankSum:
        """The sum of ``history``'s updates: the kept one with the entries added since, or a
        new one when ``history`` is another sequence (another layer, a loaded state)."""
        if self._accumulated is None or self._accumulated[0]() is not history:
            self._accumulated = (weakref.ref(history), LowRankSum())
        total = self._accumulated[1]
        for index in range(total.count, len(history)):
            total.add(*history[index])
        return total

    @property
    def last(self) -> dict[str, float]:
        """The figures of the last boundary (``{}`` before the first), keyed as logged."""
        if self._merge_ms is not None:
            self._last["lorasc/merge_ms"] = self._merge_ms()
            self._merge_ms = None
        return self._last


def _weight_norm(layer) -> float:
    """``‖W‖_F`` of ``layer`` as stored (fp8: of ``scale[row] · W[row]``); a collective for a
    row-sharded ``W``."""
    weight, row_offset = local_row_block(layer.weight.detach())
    squares = weight.to(torch.float32).square().sum(dim=1)
    if layer.weight_scale is not None:
        scale = layer.weight_scale[row_offset : row_offset + weight.shape[0]]
        squares = squares * scale.to(torch.float32).square()
    total = squares.to(torch.float64).sum()
    if is_dtensor(layer.weight) and layer.weight.placements[0].is_shard():
        dist.all_reduce(total, group=layer.weight.device_mesh.get_group())
    return math.sqrt(float(total))
