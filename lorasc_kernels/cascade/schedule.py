"""``Cascade``: the LoRASC schedule over a model's ``LoRASCLinear`` layers.

Three lines in a training loop, and one at its end::

    cascade = Cascade(model, optimizer)          # after inject_lorasc and the optimizer
    cascade.step()                               # after each optimizer.step()
    cascade.end_epoch()                          # after each epoch
    model = cascade.finalize()                   # plain nn.Linear layers again

In cascade ``t`` every layer trains a fast LoRA on ``W_t + N_t``. At the boundary, ONE
:func:`~lorasc_kernels.merge_lowrank_` pass per layer does
``W ← round(W − N_t + slow_rate · s · B A + N_{t+1})``, then the fast LoRA is drawn afresh
and its optimizer state dropped (``optimizer.state[p]`` deleted for ``lora_A``/``lora_B``:
Adam moments, SGD momentum, ...; param groups and LR schedulers are left alone).

Design choices:

* **Noise scale once, at the start.** Each matrix's scale is ``noise_lambda · std(W₀)``,
  measured at construction and kept. Slow merges move ``std(W)`` by a negligible amount,
  while measuring it again would cost an extra pass over every ``W`` per boundary (the
  merge is one pass) and, in ``"inplace"`` mode, would measure a ``W`` that carries
  noise. A fixed scale is also what lets the merge remove the previous noise exactly.
* **Derived seeds.** The noise of cascade ``t``, the rounding bits of merge ``k`` and the
  fresh ``A`` of cascade ``t`` for layer ``i`` come from :func:`cascade_seed` of
  ``(seed, purpose, index, i)`` with the hash of :mod:`lorasc_kernels.noise`: the same on
  every rank, independent of torch's generators. (Dropout masks still take their seeds
  from torch's default generator, see :func:`lorasc_kernels.functional.draw_seed`.)
* **Noise modes.** ``"inplace"`` writes the noise into ``W`` (free per step; in reduced
  precision the noise is removed exactly only up to the rounding of each merge).
  ``"fused"`` leaves ``W`` clean and hands ``(seed, scale)`` to the kernels through
  :meth:`LoRASCLinear.set_noise`. ``"off"`` trains without noise.
* **Distributed.** Under DDP every rank runs the same boundary on the same ``W`` (build the
  ``Cascade`` after wrapping the model). Under FSDP2 each rank merges only its own rows of
  ``W`` with their global ``row_offset`` (:mod:`lorasc_kernels.distributed`): the noise,
  rounding bits, ``std(W)`` and fresh ``A`` are those of the unsharded run and no rank
  gathers a ``W``.

Resuming: construct the model, optimizer and ``Cascade`` as for a fresh run, THEN load the
model's, the optimizer's and the cascade's state dicts (and torch's RNG state if the LoRA
dropout is on). The model's state must be loaded after the ``Cascade`` is built, because
construction injects the first noise into ``W``; where the weights are loaded first, build
the Cascade with :meth:`Cascade.from_state_dict` instead, which injects nothing.

Failures: every public method checks everything (every layer's merge included) before it
writes, so one that raises leaves the weights, the optimizer and the counters as they were;
one Cascade drives a model at a time (see docs/reliability.md).

Around it: :mod:`.cascade_settings` (the settings, checked once), :mod:`.cascade_state`
(the saved state, its version and checks), :mod:`.optimizer_tracking` (which optimizers'
fast-LoRA state each boundary drops) and :mod:`.slow_update` (the other parameters' slow
update). Why the defaults are what they are: docs/method.md.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import _checks as checks
from ..distributed import (
    full_tensor,
    global_std,
    is_dtensor,
    local_row_block,
    unwrap_data_parallel,
)
from ..inject import lorasc_layers
from ..integrations.peft import (
    PeftLoraLayer,
    keep_base_weights_in_saves,
    peft_lora_layers,
    plain_model,
)
from ..layer import LoRASCLinear
from ..noise import stream_key
from .history import history_state, new_history, restored_history
from .merges import (
    MergeRequest,
    Precheck,
    check_weight_values,
    prepare_merges,
    raise_on_every_rank,
    read_flags,
)
from .metrics import DEFAULT_EVERY, BoundaryMetrics
from .optimizers import OptimizerTracker, check_optimizer, other_trainable_params
from .settings import CascadeSettings
from .slow_update import SlowUpdate
from .state import STATE_VERSION, check_state, upgraded

__all__ = ["Cascade", "cascade_seed", "driven_layers"]

logger = logging.getLogger("lorasc_kernels")

# What a derived seed is for (an input of the hash, not a noise stream).
PURPOSE_NOISE = 0
PURPOSE_ROUNDING = 1
PURPOSE_INIT = 2

# The Cascade driving each layer, so that a second one is refused (its noise and merges would
# be applied on top of the first's). Weak both ways: a layer or a Cascade that is gone frees
# its entry.
_DRIVERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cascade_seed(seed: int, purpose: int, index: int, layer_index: int) -> int:
    """A 32-bit seed for ``(seed, purpose, index, layer_index)``, identical on every rank.

    ``stream_key`` of ``(purpose key, index)`` on "stream" ``layer_index``: a bijection in
    ``index`` for a fixed layer, so no two cascades of one layer share a seed.
    """
    purpose_key = stream_key(seed, purpose)
    return stream_key((purpose_key << 32) | index, layer_index)


class Cascade:
    """Runs the LoRASC schedule on every ``LoRASCLinear`` of ``model``.

    Args:
        model: a model holding ``LoRASCLinear`` layers (see :func:`inject_lorasc`), maybe
            wrapped in ``DistributedDataParallel`` (layers are named as inside it).
        optimizer: the optimizer of their ``lora_A``/``lora_B``; anything with ``state``
            and ``param_groups`` like ``torch.optim.Optimizer``.
        settings: a :class:`CascadeSettings` (its defaults if None), each value documented
            there; ``overrides`` replace some of them by name, e.g.
            ``Cascade(model, optimizer, steps_per_cascade=500, slow_rate=0.5)``.

    With ``warmup_steps``, ``lr_lambda(schedule)`` returns ``step ↦ schedule(step) ·
    lr_factor()`` for ``torch.optim.lr_scheduler.LambdaLR``, where ``lr_factor() = min(1,
    (k + 1) / warmup_steps)`` for the ``k``-th step of the current cascade; call
    ``scheduler.step()`` after ``cascade.step()``. The measured reasons for the defaults,
    the slow update and the warm-up: ``docs/method.md``.
    """

    def __init__(
        self, model: nn.Module, optimizer, *, settings: CascadeSettings | None = None, **overrides
    ):
        self._attach(model, optimizer, CascadeSettings.of(settings, **overrides))
        for name, layer in self.layers.items():
            if layer.weight_noise is not None:
                raise ValueError(
                    f"layer {checks.layer_label(name)}: its weight carries the in-place noise "
                    "of another Cascade that was not finalized; finalize that Cascade, or "
                    "continue its run with Cascade.from_state_dict"
                )
        self.noise_scales = []
        for name, layer in self.layers.items():
            with checks.naming_layer(name):
                self.noise_scales.append(self._measure_noise_scale(layer))
        self._start_first_noise()
        self._start_driving()

    @classmethod
    def from_state_dict(cls, model: nn.Module, optimizer, state: dict) -> Cascade:
        """Continue a saved run on a model and optimizer that already hold its state.

        Takes the settings from ``state`` and, unlike building a Cascade (which injects the
        first noise) and then loading, leaves ``W`` alone: for weights loaded first, as a
        Hugging Face ``Trainer`` does when it resumes from a checkpoint.
        """
        state = upgraded(state)
        try:
            settings = CascadeSettings(**state["settings"])
        except TypeError as error:
            raise TypeError(f"state['settings']: {error}") from None
        cascade = cls.__new__(cls)
        cascade._attach(model, optimizer, settings)
        cascade.load_state_dict(state)
        cascade._start_driving()
        return cascade

    def _attach(self, model: nn.Module, optimizer, settings: CascadeSettings) -> None:
        """Check and keep the model, optimizer and settings; counters at the run's start."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self._settings = settings
        self.model = model
        self.layers = driven_layers(unwrap_data_parallel(model))
        if not self.layers:
            raise ValueError(
                "model has no LoRASCLinear layer: call inject_lorasc first (or "
                "peft.get_peft_model: PEFT LoRA layers are driven as they are)"
            )
        for name, layer in self.layers.items():
            driver = _DRIVERS[layer]() if layer in _DRIVERS else None
            if driver is not None and not driver.finalized:
                raise ValueError(
                    f"layer {checks.layer_label(name)} is driven by another Cascade already: "
                    "finalize it first (one Cascade per model)"
                )
            with checks.naming_layer(name):
                checks.check_writable("weight", layer.weight.detach())
                if settings.applied_noise_mode == "fused" and (
                    not isinstance(layer, LoRASCLinear) or layer.weight_format is not None
                ):
                    raise ValueError(
                        "noise_mode='fused' is not supported on "
                        f"{layer.weight_format or 'PEFT'} layers (the fused kernels of "
                        "LoRASCLinear add the noise): use 'inplace' or noise_lambda=0"
                    )
        check_weight_values(self.layers)
        self.tracker = OptimizerTracker(optimizer, self.layers)
        self.cascade_index = 0
        self.steps_in_cascade = 0
        self.finalized = False
        # A boundary an error cut off (what it finished), and whether finalize()'s merge ran.
        self._progress: _BoundaryProgress | None = None
        self._last_merged = False
        self.history = new_history(settings, self.layers)  # per layer, (c·B, A) pairs
        params = self._slow_params(optimizer)
        names = {id(p): name for name, p in unwrap_data_parallel(model).named_parameters()}
        self.slow_update = SlowUpdate(
            params, [names.get(id(p), "a trained parameter") for p in params], settings.slow_rate
        )
        # Whether lr_lambda() was handed out: the warm-up acts only through it.
        self.warmup_wired = False
        self.metrics = BoundaryMetrics(list(self.layers))
        # Per layer, the relative error of the last export_peft_adapter(max_rank=k).
        self.export_errors: dict[str, float] = {}

    @property
    def settings(self) -> CascadeSettings:
        """The run's settings, fixed at construction (W's noise and merges depend on them:
        a new value would leave a noise in W that no boundary removes). Read-only."""
        return self._settings

    # -- the schedule ---------------------------------------------------------------------

    def step(self) -> bool:
        """Count one optimizer step; run the boundary when the cascade is complete.

        Returns whether a boundary ran.
        """
        self._check_active("step")
        if self.steps_in_cascade + 1 == self.settings.steps_per_cascade:
            self._check_driven("step")
            self._boundary(last=False)  # counts the step by ending the cascade, or raises
            return True
        self.steps_in_cascade += 1
        return False

    def end_epoch(self) -> bool:
        """End of an epoch: the boundary of a per-epoch schedule, a no-op for step schedules.

        Returns whether a boundary ran.
        """
        self._check_active("end_epoch")
        if self.settings.steps_per_cascade is None:
            self._check_driven("end_epoch")
            self._boundary(last=False)
            return True
        return False

    def lr_factor(self) -> float:
        """The per-cascade warm-up's multiplier of the learning rate for the next step."""
        if self.settings.warmup_steps == 0:
            return 1.0
        return min(1.0, (self.steps_in_cascade + 1) / self.settings.warmup_steps)

    def lr_lambda(self, schedule=None):
        """``step ↦ schedule(step) · lr_factor()`` for ``LambdaLR`` (``schedule``: the user's
        multiplier of the global step, None for 1); see the class docstring."""
        if schedule is not None and not callable(schedule):
            raise TypeError(
                f"schedule must be None or a function of the step, got {type(schedule).__name__}"
            )

        def multiplier(step: int) -> float:
            return (1.0 if schedule is None else schedule(step)) * self.lr_factor()

        self.warmup_wired = True
        return multiplier

    def finalize(self) -> nn.Module:
        """Remove the noise, do the last merge, and put plain ``nn.Linear`` layers back.

        Each replacement shares its layer's weight and bias storage; the fast LoRA
        parameters and their optimizer state are dropped. Returns the model (the new
        ``nn.Linear`` if the model itself was a ``LoRASCLinear``); for a PEFT model its base
        model (``get_base_model()``), a plain model that holds every merge:
        ``save_pretrained`` writes it whole and ``from_pretrained`` loads it as it is.
        """
        self._check_active("finalize")
        if not self._last_merged:  # else a finalize() cut off while putting linears back
            if self._progress is None:  # else finish the last boundary an error cut off
                from .export import check_final_weights_fit

                self.check_mergeable("finalize")
                check_final_weights_fit(self)
            self._boundary(last=True)
            self._last_merged = True
        self.tracker.stop()
        root = unwrap_data_parallel(self.model)
        for name, layer in self.layers.items():
            if not name:
                self.model = layer.to_linear()
                continue
            parent_name, _, child = name.rpartition(".")
            parent = root.get_submodule(parent_name)
            if getattr(parent, child) is layer.driven_module:  # else put back by a cut-off
                setattr(parent, child, layer.to_linear())  # finalize()
        self.finalized = True
        if isinstance(next(iter(self.layers.values())), PeftLoraLayer):
            return plain_model(unwrap_data_parallel(self.model))[0]
        return self.model

    # -- what the boundaries did ----------------------------------------------------------

    @property
    def last_boundary(self) -> dict[str, float]:
        """The figures of the last boundary, keyed as logged (``{}`` before the first):
        ``lorasc/cascade`` (index of the cascade it ended), ``lorasc/merge_ms`` and, on a
        measured boundary, ``lorasc/update_ratio``, ``lorasc/cascade_effective_rank`` and
        (with ``keep_history``) ``lorasc/effective_rank``; see :mod:`.cascade_metrics`."""
        return dict(self.metrics.last)

    def track_metrics(self, every: int = DEFAULT_EVERY, layer: str | None = None) -> None:
        """Measure every ``every``-th boundary (0: none; default 10, also before any call)
        on the layer named ``layer`` (default: the first) for :attr:`last_boundary`."""
        self.metrics.configure(every, layer)

    def merged_state_dict(self, device: torch.device | str | None = None) -> dict:
        """The state dict of the model :meth:`finalize` would return now, the run left as it
        is; see :func:`lorasc_kernels.cascade.export.merged_state_dict`."""
        from .export import merged_state_dict

        self._check_active("merged_state_dict")
        return merged_state_dict(self, device)

    def save_merged(self, folder: str | Path, max_shard_bytes: int = 5 * 10**9) -> Path:
        """Write :meth:`merged_state_dict`'s tensors to safetensors shards in ``folder``, one
        merged layer in memory at a time; see :func:`lorasc_kernels.cascade.export.save_merged`."""
        from .export import save_merged

        self._check_active("save_merged")
        return save_merged(self, folder, max_shard_bytes)

    def export_peft_adapter(self, path: str | Path, max_rank: int | None = None) -> Path:
        """Write the merged updates as one PEFT LoRA adapter (``keep_history=True``); see
        :func:`lorasc_kernels.cascade.export.export_peft_adapter`."""
        from .export import export_peft_adapter

        return export_peft_adapter(self, path, max_rank)

    # -- the model and optimizer ----------------------------------------------------------

    @property
    def optimizer(self):
        """The optimizer the Cascade was built with, or the one :meth:`use_optimizer` took."""
        return self.tracker.optimizer

    def runs_on(self, model: nn.Module) -> bool:
        """Whether ``model`` (maybe wrapped in DDP) holds exactly this Cascade's layers."""
        if not isinstance(model, nn.Module):
            return False
        try:
            layers = driven_layers(unwrap_data_parallel(model))
        except ValueError:
            return False
        return list(map(id, layers.values())) == list(map(id, self.layers.values()))

    def use_optimizer(self, optimizer) -> None:
        """Hand over the optimizer that trains from now on (one built after the Cascade).

        Checked as the constructor's. It must hold the same other trainable parameters
        (those the slow update anchors). An optimizer that steps the fast LoRA without being
        handed over is noticed as well (by a step hook on every ``torch.optim.Optimizer``):
        each boundary drops the fast LoRA's state from it too, so no moments of one fast
        LoRA carry over to the next.
        """
        self._check_active("use_optimizer")
        if optimizer is self.optimizer:
            return
        check_optimizer(optimizer, self.layers)
        if set(map(id, self._slow_params(optimizer))) != set(map(id, self.slow_update.params)):
            raise ValueError(
                "optimizer holds other trainable parameters besides the fast LoRAs than the "
                "Cascade's optimizer (the slow update keeps an anchor for each): build it over "
                "the same parameters"
            )
        self.tracker.optimizer = optimizer

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Counters, noise scales, settings, the anchors of the other parameters' slow
        update (copies) and (with ``keep_history``) the merged updates; the keys of
        :data:`~lorasc_kernels.cascade.state.STATE_KEYS`."""
        if self._progress is not None:
            raise RuntimeError(
                "Cascade.state_dict(): a boundary was cut off by an error and is half done; "
                "call step() (or finalize()) again to finish it, then save"
            )
        return {
            "version": STATE_VERSION,
            "settings": asdict(self.settings),
            "layer_names": list(self.layers),
            "cascade_index": self.cascade_index,
            "steps_in_cascade": self.steps_in_cascade,
            "finalized": self.finalized,
            "noise_scales": list(self.noise_scales),
            "history": history_state(self.history),
            "anchors": [anchor.clone() for anchor in self.slow_update.anchors],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue a saved run; see the module docstring for the order of loading.

        Every entry of ``state`` is checked before any is taken: a bad one raises naming it
        and leaves the Cascade as it was. Older states load (:mod:`.cascade_state`).
        """
        self._check_active("load_state_dict")
        state = upgraded(state)
        check_state(state, self.settings, self.layers, self.slow_update.anchors)
        history = restored_history(state["history"], self.settings, self.layers)
        self.cascade_index = int(state["cascade_index"])
        self.steps_in_cascade = int(state["steps_in_cascade"])
        self.noise_scales = [float(scale) for scale in state["noise_scales"]]
        self.history = history
        self.slow_update.load(state["anchors"])
        for index, _, layer in self._indexed_layers():
            noise = self._noise(self.cascade_index, index)
            if self.settings.applied_noise_mode == "fused":
                layer.set_noise(*noise)
            elif self.settings.applied_noise_mode == "inplace":
                layer.weight_noise = _written(noise)  # the loaded weights carry it

    # -- the boundary's merges ------------------------------------------------------------

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

    # -- internals ------------------------------------------------------------------------

    def _indexed_layers(self) -> Iterator[tuple[int, str, LoRASCLinear]]:
        for index, (name, layer) in enumerate(self.layers.items()):
            yield index, name, layer

    def _check_active(self, what: str) -> None:
        if self.finalized:
            raise RuntimeError(f"Cascade.{what}() after finalize(): the cascade is over")

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
                    "no optimizer step reached them since the last boundary; call "
                    "optimizer.step() before cascade.step()",
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

    def _start_driving(self) -> None:
        """Claim the layers and note every optimizer that steps them: the last step of a
        construction (the hook lives until :meth:`finalize` or the Cascade is gone)."""
        for layer in self.layers.values():
            _DRIVERS[layer] = weakref.ref(self)
        self.tracker.start()
        keep_base_weights_in_saves(unwrap_data_parallel(self.model), list(self.layers))

    def _slow_params(self, optimizer) -> list[nn.Parameter]:
        """The parameters the slow update anchors: none if it is off or is the identity."""
        if not self.settings.slow_other_params or self.settings.slow_rate == 1.0:
            return []
        return other_trainable_params(optimizer, self.layers)

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


def driven_layers(model: nn.Module) -> dict:
    """The layers a Cascade drives, by module path: ``model``'s ``LoRASCLinear`` layers, or
    its PEFT LoRA layers (:class:`~lorasc_kernels.integrations.peft.PeftLoraLayer`)."""
    layers = lorasc_layers(model)
    peft = peft_lora_layers(model)
    if layers and peft:
        raise ValueError(
            "model has both LoRASCLinear and PEFT LoRA layers: a Cascade drives "
            "one kind (inject_lorasc refuses PEFT models for this reason)"
        )
    return layers or peft


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
