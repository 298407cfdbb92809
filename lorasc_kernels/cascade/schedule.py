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

Around it: :mod:`.boundary` (what a boundary does: seeds, noise, merges), :mod:`.settings`
(the settings, checked once), :mod:`.state` (the saved state, its version and checks),
:mod:`.optimizers` (which optimizers' fast-LoRA state each boundary drops) and
:mod:`.slow_update` (the other parameters' slow update). Why the defaults are what they
are: docs/method.md.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .. import _checks as checks
from ..distributed import (
    unwrap_data_parallel,
)
from ..inject import replace_submodule
from ..integrations.peft import (
    PeftLoraLayer,
    keep_base_weights_in_saves,
    plain_model,
)
from ..layer import LoRASCLinear
from .boundary import CascadeBoundaries, _BoundaryProgress, _written
from .driven import driven_layers
from .history import history_state, new_history, restored_history
from .merges import (
    check_weight_values,
)
from .metrics import DEFAULT_EVERY, BoundaryMetrics
from .optimizers import OptimizerTracker, check_optimizer, other_trainable_params
from .settings import CascadeSettings
from .slow_update import SlowUpdate
from .state import STATE_VERSION, check_state, upgraded

__all__ = ["Cascade"]

logger = logging.getLogger("lorasc_kernels")

# The Cascade driving each layer, so that a second one is refused (its noise and merges would
# be applied on top of the first's). Weak both ways: a layer or a Cascade that is gone frees
# its entry.
_DRIVERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Cascade(CascadeBoundaries):
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
            replace_submodule(  # a module other than the layer: put back by a cut-off finalize
                root,
                name,
                lambda module, layer=layer: (
                    layer.to_linear() if module is layer.driven_module else module
                ),
            )
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
        (with ``keep_history``) ``lorasc/effective_rank``; see :mod:`.metrics`."""
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
        and leaves the Cascade as it was. Older states load (:mod:`.state`).
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

    # -- internals ------------------------------------------------------------------------

    def _indexed_layers(self) -> Iterator[tuple[int, str, LoRASCLinear]]:
        for index, (name, layer) in enumerate(self.layers.items()):
            yield index, name, layer

    def _check_active(self, what: str) -> None:
        if self.finalized:
            raise RuntimeError(f"Cascade.{what}() after finalize(): the cascade is over")

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
