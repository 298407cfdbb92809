"""The boundary of a :class:`~lorasc_kernels.cascade.Cascade`: what ends one cascade and
starts the next, as the base class :class:`CascadeBoundaries` of ``Cascade``.

* the derived seeds (:func:`cascade_seed`) of each layer's noise, rounding bits and fresh
  ``A``, and the noise each layer carries;
* the merge requests of a boundary (:meth:`CascadeBoundaries.boundary_requests`), the one
  source of the merges' arguments for the boundary and for the exports;
* the checks read with a boundary's merges (finite fast LoRAs, trained or not), and the
  checks before any merge (:meth:`CascadeBoundaries.check_mergeable`);
* the boundary itself, resumable after an error (:class:`_BoundaryProgress`), and timed.

It reads the Cascade's settings, counters, layers, history, optimizer tracker and slow
update (``schedule.py`` builds them).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from .. import _checks as checks
from ..distributed import full_tensor, global_std, is_dtensor, local_row_block, unwrap_data_parallel
from ..layer import LoRASCLinear
from ..noise import stream_key
from .merges import MergeRequest, Precheck, prepare_merges, raise_on_every_rank, read_flags

__all__ = ["CascadeBoundaries", "cascade_seed"]

logger = logging.getLogger("lorasc_kernels")

# What a derived seed is for (an input of the hash, not a noise stream).
PURPOSE_NOISE = 0
PURPOSE_ROUNDING = 1
PURPOSE_INIT = 2


def cascade_seed(seed: int, purpose: int, index: int, layer_index: int) -> int:
    """A 32-bit seed for ``(seed, purpose, index, layer_index)``, identical on every rank.

    ``stream_key`` of ``(purpose key, index)`` on "stream" ``layer_index``: a bijection in
    ``index`` for a fixed layer, so no two cascades of one layer share a seed.
    """
    purpose_key = stream_key(seed, purpose)
    return stream_key((purpose_key << 32) | index, layer_index)


class CascadeBoundaries:
    """The boundary's part of :class:`~lorasc_kernels.cascade.Cascade` (see the module)."""

    def boundary_requests(self, last: bool = False) -> list[MergeRequest]:
        """Per driven layer, in :attr:`layers`' order, the merge that the boundary ending the
        current cascade asks for (``last``: :meth:`finalize`'s): ``coeff = slow_rate · s``,
        the rounding seed and, in ``"inplace"`` mode, the noise to remove and the next
        cascade's to add (``(seed, scale)``; none when ``last``). The one source of these
        arguments: the boundary merges them; :meth:`merged_state_dict`, :meth:`save_merged`
        and :meth:`finalize`'s checks merge copies of the weights with them. Reads the
        counters and settings only."""
        t = self.cascade_index
        inplace = self.settings.applied_noise_mode == "inplace"
        return [
            MergeRequest(
                name,
                layer,
                self._rounding_seed(t + 1, index),
                self.settings.slow_rate * layer.scaling,
                self._noise(t, index) if inplace else None,
                self._following_noise(index, last) if inplace else None,
            )
            for index, name, layer in self._indexed_layers()
        ]

    def check_mergeable(self, what: str) -> None:
        """Refuse a merge now, as ``Cascade.<what>()``, before anything is written: a driven
        layer no longer at its module path, or a PEFT layer changed (:meth:`_check_driven`,
        ``RuntimeError``); a fast LoRA or slow-updated parameter that is not finite
        (``ValueError``; under FSDP2 every rank raises when one refuses)."""
        self._check_driven(what)
        self._check_finite_lora()

    def _check_driven(self, what: str) -> None:
        """Before a merge: every driven layer's ``driven_module`` still sits at its module path
        in the model, and the layer is unchanged (:meth:`DrivenLayer.check_unchanged`: a PEFT
        layer unmerged, active and enabled); raises ``RuntimeError`` naming the first that is
        not. Module lookups and flags only, no tensor read."""
        root = unwrap_data_parallel(self.model)
        for name, layer in self.layers.items():
            module = layer.driven_module
            try:
                found = root.get_submodule(name)
            except AttributeError:
                found = None
            if found is not module:
                raise RuntimeError(
                    f"Cascade.{what}(): the model no longer holds the layer "
                    f"{checks.layer_label(name)} this Cascade drives at its module path (it "
                    "was replaced or removed, e.g. by merge_and_unload() or unload()): put "
                    "it back; nothing was merged"
                )
            layer.check_unchanged(name)

    def _measure_noise_scale(self, layer: LoRASCLinear) -> float:
        if self.settings.applied_noise_mode == "off":
            return 0.0
        # fp8: of the dequantized W (the noise goes into W only, merged like an update)
        return self.settings.noise_lambda * global_std(layer.weight, layer.weight_scale)

    def _noise(self, cascade_index: int, layer_index: int) -> tuple[int, float]:
        """``(seed, scale)`` of the noise layer ``layer_index`` carries in a cascade."""
        seed = cascade_seed(self.settings.seed, PURPOSE_NOISE, cascade_index, layer_index)
        return seed, self.noise_scales[layer_index]

    def _start_first_noise(self) -> None:
        """The noise of cascade 0 in every layer, each checked before the first is written."""
        mode = self.settings.applied_noise_mode
        if mode == "off":
            return
        merges = self._prepare_merges(
            [
                MergeRequest(
                    name, layer, self._rounding_seed(0, index), 0.0, None, self._noise(0, index)
                )
                for index, name, layer in self._indexed_layers()
            ]
        )
        for (index, _, layer), merge in zip(self._indexed_layers(), merges, strict=True):
            if mode == "fused":  # the merge only checked that W + noise stays finite
                layer.set_noise(*self._noise(0, index))
            else:
                merge()
                layer.weight_noise = _written(self._noise(0, index))

    def _prepare_merges(self, requests: list[MergeRequest], precheck=None) -> list:
        """The checked merges (none run) of ``requests``; see :func:`prepare_merges`."""
        return prepare_merges(requests, self.settings.rounding, self.layers.values(), precheck)

    def _rounding_seed(self, merge_index: int, layer_index: int) -> int:
        """The seed of the stochastic rounding of merge ``merge_index`` into a layer."""
        return cascade_seed(self.settings.seed, PURPOSE_ROUNDING, merge_index, layer_index)

    def _following_noise(self, index: int, last: bool) -> tuple[int, float] | None:
        """``(seed, scale)`` of the noise layer ``index`` carries in the next cascade; None
        when there is none (noise off, or after :meth:`finalize`)."""
        if self.settings.applied_noise_mode == "off" or last:
            return None
        return self._noise(self.cascade_index + 1, index)

    def _prepare_boundary(self, last: bool, precheck=None, merged=frozenset()) -> list:
        """Per layer ``(request, following noise, merge)`` (:meth:`boundary_requests`), every
        merge checked (``precheck`` read with them), none run; ``merge`` is None for the
        layers in ``merged`` (merged already by a boundary an error cut off)."""
        requests = self.boundary_requests(last)
        following = [self._following_noise(index, last) for index in range(len(requests))]
        planned = [request for request in requests if request.name not in merged]
        noise_checks = [  # fused: W + the next noise stays finite
            request._replace(noise_add=noise)
            for request, noise in zip(requests, following, strict=True)
            if self.settings.applied_noise_mode == "fused"
            and noise is not None
            and request.name not in merged
        ]
        merges = dict(
            zip(
                [request.name for request in planned],
                self._prepare_merges(planned + noise_checks, precheck),
                strict=False,
            )
        )
        return [
            (request, noise, merges.get(request.name))
            for request, noise in zip(requests, following, strict=True)
        ]

    def _boundary(self, last: bool) -> None:
        """End cascade ``t``: merge every layer, swap the noise, start fresh fast LoRAs.

        Resumable: what it has finished is kept in :attr:`_progress` until it completes, so
        that after an error raised in the middle (out of memory, Ctrl-C) the next call
        finishes exactly what is left, as the boundary would have: no layer is merged twice,
        no history entry kept twice, no parameter slow-updated twice."""
        t = self.cascade_index
        mode = self.settings.applied_noise_mode
        progress = self._progress
        if progress is not None and (progress.cascade_index, progress.last) != (t, last):
            raise RuntimeError(
                f"Cascade: a {'finalize' if progress.last else 'boundary'} was cut off by an "
                "error; call that again to finish it first"
            )
        if progress is None:
            if t == 0 and self.settings.warmup_steps and not self.warmup_wired:
                logger.warning(
                    "Cascade(warmup_steps=%d) has no effect: pass cascade.lr_lambda() "
                    "to torch.optim.lr_scheduler.LambdaLR",
                    self.settings.warmup_steps,
                )
            timer = _BoundaryTimer({layer.weight.device for layer in self.layers.values()})
            anchors = self.slow_update.prepared_anchors()
            read = {}  # the boundary's own flags, as read with the merges' (one host read)
            plans = self._prepare_boundary(last, self._boundary_precheck(read))
            if not read["trained"] and not last:
                logger.warning(
                    "LoRASC cascade %d ends with every fast LoRA as it was drawn (lora_B = 0): "
                    "no optimizer step changed them since the last boundary (is "
                    "optimizer.step() called before cascade.step(), and do they get nonzero "
                    "gradients at a nonzero learning rate?)",
                    t,
                )
            # A merge of all-zero B (finalize right after a boundary) adds nothing to record.
            record = self.settings.keep_history and read["trained"]
            progress = _BoundaryProgress(t, last, timer, anchors, record)
        else:  # finish the boundary an error cut off: plan only the layers not merged yet
            merged = {name for name, stage in progress.stages.items() if stage >= _MERGED}
            plans = self._prepare_boundary(last, merged=merged)
        self._progress = progress
        for (index, name, layer), (request, following, merge) in zip(
            self._indexed_layers(), plans, strict=True
        ):
            stage = progress.stages.get(name, 0)
            if stage == _DONE:
                continue
            if stage < _MERGED:
                if name == self.metrics.layer:
                    progress.sample = self.metrics.sample(t, layer, request.coeff)
                if progress.record:  # B and A as merged, read before the merge
                    progress.updates[name] = (
                        len(self.history[name]),
                        _update_on_cpu(layer, request.coeff),
                    )
                merge()
                progress.stages[name] = _MERGED
            # From here each step can be run again (an error in it: the next call does).
            if mode == "inplace":
                layer.weight_noise = _written(following)
            if name in progress.updates:  # kept once: the history's length says if it was
                length, update = progress.updates[name]
                if len(self.history[name]) == length:
                    self.history[name].append(update)
            if mode == "fused":
                seed, scale = following or (None, 0.0)
                layer.set_noise(seed, scale)
            self.tracker.drop_state(layer)
            if not last:
                layer.reset_lora(self._init_generator(layer, t + 1, index))
            progress.stages[name] = _DONE
        self.slow_update.apply(progress.anchors, progress.slow_updated)
        self._progress = None
        self.cascade_index = t + 1
        self.steps_in_cascade = 0
        merge_ms = progress.timer.stop()
        self.metrics.record(t, merge_ms, progress.sample, self.history[self.metrics.layer])
        if logger.isEnabledFor(logging.INFO):  # the time read waits for the GPU
            logger.info(
                "LoRASC cascade %d %s: merged %d layers in %.1f ms, mean noise scale %.3g",
                t,
                "finalized" if last else "ended",
                len(self.layers),
                self.metrics.last["lorasc/merge_ms"],
                sum(self.noise_scales) / len(self.noise_scales),
            )

    def _finite_precheck(self) -> Precheck:
        """Every fast LoRA and slow-updated parameter finite (this rank's rows), as flags not
        read yet; ``conclude`` refuses the first that is not, naming it."""
        factors = [
            (f"{name or 'model'}.{kind}", local_row_block(parameter.detach())[0])
            for name, layer in self.layers.items()
            for kind, parameter in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B))
        ]
        flags = [torch.isfinite(local).all().reshape(1) for _, local in factors]

        def conclude(values: list[list[bool]]) -> None:
            for (label, _), (finite,) in zip(factors, values, strict=False):
                if not finite:
                    raise ValueError(
                        f"{label} has non-finite values: no layer was merged and the "
                        "cascade is unchanged"
                    )
            self.slow_update.conclude_finite(values[len(factors)])

        return Precheck([*flags, self.slow_update.finite_flags()], conclude)

    def _boundary_precheck(self, read: dict) -> Precheck:
        """:meth:`_finite_precheck` and whether any fast LoRA trained (``lora_B ≠ 0``, into
        ``read["trained"]``), as flags read with the boundary's merges. Sharded (FSDP2)
        factors: ``trained`` is reduced over the ranks (a read of its own)."""
        finite = self._finite_precheck()
        flags = list(finite.flags)
        sharded = any(is_dtensor(layer.lora_B) for layer in self.layers.values())
        if not sharded:
            trained = [layer.lora_B.detach().any() for layer in self.layers.values()]
            flags.append(torch.stack(trained).any().reshape(1))

        def conclude(values: list[list[bool]]) -> None:
            finite.conclude(values[: len(finite.flags)])
            read["trained"] = (
                values[-1][0]
                if not sharded
                else any(bool(layer.lora_B.detach().any()) for layer in self.layers.values())
            )

        return Precheck(flags, conclude)

    def _check_finite_lora(self) -> None:
        """Refuse, before any merge, a fast LoRA or a slow-updated parameter that diverged
        (inf or NaN): :meth:`_finite_precheck` in one host read; under FSDP2 every rank
        raises when one refuses."""
        precheck, failure = self._finite_precheck(), None
        try:
            precheck.conclude(read_flags(precheck.flags))
        except ValueError as error:
            failure = error
        raise_on_every_rank(failure, self.layers.values())

    def _init_generator(self, layer: LoRASCLinear, cascade_index: int, index: int):
        generator = torch.Generator(device=layer.lora_A.device)
        generator.manual_seed(cascade_seed(self.settings.seed, PURPOSE_INIT, cascade_index, index))
        return generator


# How far a boundary got with a layer (_BoundaryProgress.stages).
_MERGED = 1  # W holds the merge; the noise, history and fresh LoRA may not be done
_DONE = 2


@dataclass
class _BoundaryProgress:
    """What boundary ``cascade_index`` (``last``: finalize's) has done so far, kept while an
    error leaves it unfinished: each layer's stage, its history entry (read before its
    merge, with the history's length then), the slow-update values written, and what its
    start decided."""

    cascade_index: int
    last: bool
    timer: _BoundaryTimer
    anchors: list
    record: bool
    sample: object = None
    stages: dict = field(default_factory=dict)
    updates: dict = field(default_factory=dict)
    slow_updated: dict = field(default_factory=dict)


class _BoundaryTimer:
    """Times a boundary without waiting for the GPU: on one CUDA device, two CUDA events
    (their elapsed time read when asked); on the CPU, or several devices, the host clock
    after a synchronize of each device."""

    def __init__(self, devices: set[torch.device]):
        self.devices = devices
        self.events = None
        if len(devices) == 1 and next(iter(devices)).type == "cuda":
            with torch.cuda.device(next(iter(devices))):
                self.events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
                self.events[0].record()
        self.started = time.perf_counter()

    def stop(self):
        """The boundary's end; returns ``merge_ms()``, its duration in ms (read lazily)."""
        if self.events is not None:
            with torch.cuda.device(next(iter(self.devices))):
                self.events[1].record()
            start, end = self.events
            return lambda: (end.synchronize(), start.elapsed_time(end))[1]
        for device in self.devices:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        milliseconds = 1e3 * (time.perf_counter() - self.started)
        return lambda: milliseconds


def _written(noise: tuple[int, float] | None) -> tuple[int, float] | None:
    """``noise`` as ``LoRASCLinear.weight_noise`` records it: None when it adds nothing."""
    return noise if noise is not None and noise[1] != 0.0 else None


def _update_on_cpu(layer: LoRASCLinear, coeff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(coeff · B, A)`` of ``layer`` as new float32 CPU tensors."""
    lora_b = full_tensor(layer.lora_B.detach()).to("cpu", torch.float32) * coeff
    lora_a = full_tensor(layer.lora_A.detach()).to("cpu", torch.float32, copy=True)
    return lora_b, lora_a
