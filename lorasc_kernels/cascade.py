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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from . import _checks as checks
from .distributed import full_tensor, global_std, local_row_block, reset_lora
from .functional import merge_lowrank_
from .inject import lorasc_layers
from .modules import LoRASCLinear
from .noise import stream_key
from .rounding import ROUNDING_MODES

__all__ = ["NOISE_MODES", "CascadeSettings", "Cascade", "cascade_seed"]

logger = logging.getLogger("lorasc_kernels")

NOISE_MODES = ("inplace", "fused", "off")

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


@dataclass(frozen=True)
class CascadeSettings:
    """The settings of a :class:`Cascade`, checked on creation (see ``Cascade``)."""

    steps_per_cascade: int | None = None
    slow_rate: float = 0.5
    noise_lambda: float = 0.15
    noise_mode: str = "inplace"
    seed: int = 0
    keep_history: bool = False
    rounding: str = "stochastic"
    slow_other_params: bool = True
    warmup_steps: int = 0

    def __post_init__(self):
        if self.steps_per_cascade is not None:
            checks.check_int("steps_per_cascade", self.steps_per_cascade, 1)
        slow_rate = checks.check_float("slow_rate", self.slow_rate)
        if not 0.0 < slow_rate <= 1.0:
            raise ValueError(f"slow_rate must be in (0, 1], got {slow_rate}")
        checks.check_float("noise_lambda", self.noise_lambda, minimum=0.0)
        checks.check_choice("noise_mode", self.noise_mode, NOISE_MODES)
        checks.check_seed("seed", self.seed)
        if not isinstance(self.keep_history, bool):
            raise TypeError(f"keep_history must be a bool, got {type(self.keep_history).__name__}")
        checks.check_choice("rounding", self.rounding, ROUNDING_MODES)
        if not isinstance(self.slow_other_params, bool):
            raise TypeError(
                f"slow_other_params must be a bool, got {type(self.slow_other_params).__name__}"
            )
        checks.check_int("warmup_steps", self.warmup_steps, 0, self.steps_per_cascade)


class Cascade:
    """Runs the LoRASC schedule on every ``LoRASCLinear`` of ``model``.

    Args:
        model: a model holding ``LoRASCLinear`` layers (see :func:`inject_lorasc`), maybe
            wrapped in ``DistributedDataParallel`` (layers are named as inside it).
        optimizer: the optimizer of their ``lora_A``/``lora_B``; anything with ``state``
            and ``param_groups`` like ``torch.optim.Optimizer``.
        steps_per_cascade: cascade length in ``step()`` calls; None: one cascade per epoch,
            ended by ``end_epoch()``.
        slow_rate: the portion α in (0, 1] of each fast LoRA folded into ``W``.
        noise_lambda: noise scale relative to each matrix's std (NoisyTune's λ).
        noise_mode: ``"inplace"`` (noise written into ``W``), ``"fused"`` (added by the
            kernels, ``W`` untouched) or ``"off"``.
        seed: root of every seed the schedule derives.
        keep_history: keep each merged ``(slow_rate·s·B_t, A_t)`` on the CPU in float32,
            for :meth:`export_peft_adapter`.
        rounding: rounding of the merges into ``W``'s dtype, ``"stochastic"`` or ``"nearest"``.
        slow_other_params: give the other trainable parameters the optimizer holds (a new
            head, norms, biases) the same slow update at each boundary, see below.
        warmup_steps: length of the linear learning-rate warm-up at the start of every
            cascade (0: none), applied through :meth:`lr_lambda`.

    **The slow update of the other parameters.** A parameter trained next to the LoRASC
    layers (a new classification head, a norm, a bias) keeps its value ``p_start`` at the
    start of each cascade; at the boundary ``p ← p_start + slow_rate · (p − p_start)``,
    in place (``torch.lerp``: elementwise, so an FSDP2 rank updates its own rows and DDP
    ranks stay identical). Without it, a head adapted to the whole fast LoRA keeps its full
    step while ``1 − slow_rate`` of the LoRA's vanishes, and the training loss jumps at every
    boundary. Their optimizer state is kept (as Lookahead keeps its inner optimizer's):
    they are the same parameters, moved part of the way back. The anchors ``p_start``
    cost one copy of those parameters and are part of :meth:`state_dict`. With
    ``slow_rate=1`` the update is the identity and no anchor is kept.

    **Per-cascade warm-up.** Every boundary hands the optimizer a fresh fast LoRA with
    empty moments; ReLoRA found a short warm-up after each such reset necessary ("jagged"
    schedule). ``lr_lambda(schedule)`` returns ``step ↦ schedule(step) · lr_factor()`` for
    ``torch.optim.lr_scheduler.LambdaLR``, where ``lr_factor() = min(1, (k + 1) /
    warmup_steps)`` for the ``k``-th step of the current cascade: the user's schedule
    (``schedule``, e.g. a cosine decay of the global step) times the jagged warm-up.
    Call ``scheduler.step()`` after ``cascade.step()``.
    """

    def __init__(self, model: nn.Module, optimizer, steps_per_cascade: int | None = None,
                 slow_rate: float = 0.5, noise_lambda: float = 0.15,
                 noise_mode: str = "inplace", seed: int = 0, keep_history: bool = False,
                 rounding: str = "stochastic", slow_other_params: bool = True,
                 warmup_steps: int = 0):
        self._attach(model, optimizer, CascadeSettings(
            steps_per_cascade, slow_rate, noise_lambda, noise_mode, seed, keep_history, rounding,
            slow_other_params, warmup_steps))
        self.noise_scales = [self._measure_noise_scale(layer) for layer in self.layers.values()]
        self._start_first_noise()

    @classmethod
    def from_state_dict(cls, model: nn.Module, optimizer, state: dict) -> Cascade:
        """Continue a saved run on a model and optimizer that already hold its state.

        Takes the settings from ``state`` and, unlike building a Cascade (which injects the
        first noise) and then loading, leaves ``W`` alone: for weights loaded first, as a
        Hugging Face ``Trainer`` does when it resumes from a checkpoint.
        """
        cascade = cls.__new__(cls)
        cascade._attach(model, optimizer, CascadeSettings(**state["settings"]))
        cascade.load_state_dict(state)
        return cascade

    def _attach(self, model: nn.Module, optimizer, settings: CascadeSettings) -> None:
        """Check and keep the model, optimizer and settings; counters at the run's start."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.settings = settings
        self.model = model
        self.layers = lorasc_layers(_unwrap(model))
        if not self.layers:
            raise ValueError("model has no LoRASCLinear layer: call inject_lorasc first")
        self.optimizer = optimizer
        _check_optimizer(optimizer, self.layers)
        self.cascade_index = 0
        self.steps_in_cascade = 0
        self.finalized = False
        self.history: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {
            name: [] for name in self.layers
        }
        self.other_params = _other_trainable_params(optimizer, self.layers)
        if not settings.slow_other_params or settings.slow_rate == 1.0:
            self.other_params = []
        # p_start of each other parameter (an FSDP2 rank's own rows), in optimizer order.
        self.anchors = [_local(p).clone() for p in self.other_params]

    # -- the schedule ---------------------------------------------------------------------

    def step(self) -> bool:
        """Count one optimizer step; run the boundary when the cascade is complete.

        Returns whether a boundary ran.
        """
        self._check_active("step")
        self.steps_in_cascade += 1
        if self.steps_in_cascade == self.settings.steps_per_cascade:
            self._boundary(last=False)
            return True
        return False

    def end_epoch(self) -> bool:
        """End of an epoch: the boundary of a per-epoch schedule, a no-op for step schedules.

        Returns whether a boundary ran.
        """
        self._check_active("end_epoch")
        if self.settings.steps_per_cascade is None:
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
        def multiplier(step: int) -> float:
            return (1.0 if schedule is None else schedule(step)) * self.lr_factor()
        return multiplier

    def finalize(self) -> nn.Module:
        """Remove the noise, do the last merge, and put plain ``nn.Linear`` layers back.

        Each replacement shares its layer's weight and bias storage; the fast LoRA
        parameters and their optimizer state are dropped. Returns the model (the new
        ``nn.Linear`` if the model itself was a ``LoRASCLinear``).
        """
        self._check_active("finalize")
        self._boundary(last=True)
        for name, layer in self.layers.items():
            linear = layer.to_linear()
            if not name:
                self.model = linear
                continue
            parent_name, _, child = name.rpartition(".")
            setattr(_unwrap(self.model).get_submodule(parent_name), child, linear)
        self.finalized = True
        return self.model

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Counters, noise scales, settings, the anchors of the other parameters' slow
        update (copies) and (with ``keep_history``) the merged updates."""
        return {
            "settings": asdict(self.settings),
            "layer_names": list(self.layers),
            "cascade_index": self.cascade_index,
            "steps_in_cascade": self.steps_in_cascade,
            "finalized": self.finalized,
            "noise_scales": list(self.noise_scales),
            "history": {name: list(pairs) for name, pairs in self.history.items()},
            "anchors": [anchor.clone() for anchor in self.anchors],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue a saved run; see the module docstring for the order of loading."""
        self._check_active("load_state_dict")
        if state["settings"] != asdict(self.settings):
            raise ValueError(
                f"state was saved with settings {state['settings']}, this Cascade has "
                f"{asdict(self.settings)}"
            )
        if state["layer_names"] != list(self.layers):
            raise ValueError("state was saved for other LoRASCLinear layers than this model's")
        if state["finalized"]:
            raise ValueError("state is of a finalized Cascade: there is nothing to resume")
        checks.check_int("state['cascade_index']", state["cascade_index"], 0)
        checks.check_int("state['steps_in_cascade']", state["steps_in_cascade"], 0)
        if len(state["noise_scales"]) != len(self.layers):
            raise ValueError(
                f"state has {len(state['noise_scales'])} noise scales for "
                f"{len(self.layers)} layers"
            )
        self.cascade_index = state["cascade_index"]
        self.steps_in_cascade = state["steps_in_cascade"]
        self.noise_scales = list(state["noise_scales"])
        self.history = {name: list(pairs) for name, pairs in state["history"].items()}
        self._load_anchors(state["anchors"])
        if self.settings.noise_mode == "fused":
            for index, _, layer in self._indexed_layers():
                layer.set_noise(*self._noise(self.cascade_index, index))

    def export_peft_adapter(self, path: str | Path) -> Path:
        """Write the merged updates as one PEFT LoRA adapter; see :mod:`.peft_export`.

        Holds every merge done so far, so after :meth:`finalize` the whole run; the noise
        is not part of it. Needs ``keep_history=True``.
        """
        from .peft_export import write_peft_adapter

        if not self.settings.keep_history:
            raise RuntimeError("export_peft_adapter needs Cascade(..., keep_history=True)")
        if not any(self.history.values()):
            raise RuntimeError("nothing to export yet: no fast LoRA has been merged")
        config = getattr(_unwrap(self.model), "config", None)
        base_name = getattr(config, "_name_or_path", None) or None  # Hugging Face models
        return write_peft_adapter(path, self.history, base_name)

    # -- internals ------------------------------------------------------------------------

    def _indexed_layers(self) -> Iterator[tuple[int, str, LoRASCLinear]]:
        for index, (name, layer) in enumerate(self.layers.items()):
            yield index, name, layer

    def _check_active(self, what: str) -> None:
        if self.finalized:
            raise RuntimeError(f"Cascade.{what}() after finalize(): the cascade is over")

    def _measure_noise_scale(self, layer: LoRASCLinear) -> float:
        if self.settings.noise_mode == "off":
            return 0.0
        return self.settings.noise_lambda * global_std(layer.weight)

    def _noise(self, cascade_index: int, layer_index: int) -> tuple[int, float]:
        """``(seed, scale)`` of the noise layer ``layer_index`` carries in a cascade."""
        seed = cascade_seed(self.settings.seed, PURPOSE_NOISE, cascade_index, layer_index)
        return seed, self.noise_scales[layer_index]

    def _start_first_noise(self) -> None:
        mode = self.settings.noise_mode
        for index, _, layer in self._indexed_layers():
            if mode == "fused":
                layer.set_noise(*self._noise(0, index))
            elif mode == "inplace":
                self._merge(index, layer, 0, coeff=0.0, noise_remove=None,
                            noise_add=self._noise(0, index))

    def _merge(self, index: int, layer: LoRASCLinear, merge_index: int, coeff: float,
               noise_remove, noise_add) -> None:
        weight, row_offset = local_row_block(layer.weight.data)  # an FSDP2 rank's rows
        lora_b = local_row_block(layer.lora_B.detach())[0].to(weight.device)
        lora_a = full_tensor(layer.lora_A.detach()).to(weight.device)
        if weight.shape[0] == 0:  # a rank holding no rows of this weight
            return
        merge_lowrank_(
            weight, lora_b, lora_a, coeff, rounding=self.settings.rounding,
            seed=cascade_seed(self.settings.seed, PURPOSE_ROUNDING, merge_index, index),
            noise_remove=noise_remove, noise_add=noise_add, row_offset=row_offset,
            backend=layer.backend,
        )

    def _boundary(self, last: bool) -> None:
        """End cascade ``t``: merge every layer, swap the noise, start fresh fast LoRAs."""
        started = time.perf_counter()
        t = self.cascade_index
        mode = self.settings.noise_mode
        self._check_finite_lora()
        # A merge of all-zero B (finalize right after a boundary) adds nothing to record.
        record = self.settings.keep_history and any(
            bool(layer.lora_B.detach().any()) for layer in self.layers.values()
        )
        for index, name, layer in self._indexed_layers():
            coeff = self.settings.slow_rate * layer.scaling
            following = None if mode == "off" or last else self._noise(t + 1, index)
            if mode == "inplace":
                self._merge(index, layer, t + 1, coeff, noise_remove=self._noise(t, index),
                            noise_add=following)
            else:
                self._merge(index, layer, t + 1, coeff, noise_remove=None, noise_add=None)
            if record:
                self.history[name].append(_update_on_cpu(layer, coeff))
            if mode == "fused":
                seed, scale = following or (None, 0.0)
                layer.set_noise(seed, scale)
            self._drop_optimizer_state(layer)
            if not last:
                reset_lora(layer, self._init_generator(layer, t + 1, index))
        self._slow_update_other_params()
        self.cascade_index = t + 1
        self.steps_in_cascade = 0
        devices = {layer.weight.device for layer in self.layers.values()}
        for device in devices:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        logger.info(
            "LoRASC cascade %d %s: merged %d layers in %.1f ms, mean noise scale %.3g",
            t, "finalized" if last else "ended", len(self.layers),
            1e3 * (time.perf_counter() - started),
            sum(self.noise_scales) / len(self.noise_scales),
        )

    def _check_finite_lora(self) -> None:
        """Refuse a boundary, before any merge, if a fast LoRA diverged (inf or NaN)."""
        for name, layer in self.layers.items():
            for kind, parameter in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
                if not bool(torch.isfinite(parameter.detach()).all()):
                    raise ValueError(
                        f"{name or 'model'}.{kind} has non-finite values: no layer was "
                        "merged and the cascade is unchanged"
                    )

    def _slow_update_other_params(self) -> None:
        """``p ← p_start + slow_rate · (p − p_start)`` in place; the result is the next anchor."""
        for parameter, anchor in zip(self.other_params, self.anchors, strict=True):
            local = _local(parameter)
            anchor.lerp_(local, self.settings.slow_rate)
            local.copy_(anchor)

    def _load_anchors(self, anchors: list) -> None:
        if len(anchors) != len(self.anchors):
            raise ValueError(
                f"state has {len(anchors)} anchors, this Cascade slow-updates "
                f"{len(self.anchors)} other parameters"
            )
        for index, (anchor, saved) in enumerate(zip(self.anchors, anchors, strict=True)):
            if saved.shape != anchor.shape or saved.dtype != anchor.dtype:
                raise ValueError(
                    f"state['anchors'][{index}] has shape {tuple(saved.shape)} and dtype "
                    f"{saved.dtype}, expected {tuple(anchor.shape)} and {anchor.dtype}"
                )
            anchor.copy_(saved)

    def _init_generator(self, layer: LoRASCLinear, cascade_index: int, index: int):
        generator = torch.Generator(device=layer.lora_A.device)
        generator.manual_seed(cascade_seed(self.settings.seed, PURPOSE_INIT, cascade_index, index))
        return generator

    def _drop_optimizer_state(self, layer: LoRASCLinear) -> None:
        for parameter in (layer.lora_A, layer.lora_B):
            self.optimizer.state.pop(parameter, None)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a (Distributed)DataParallel wrapper: layer names as the user's model has."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return model


def _local(parameter: torch.Tensor) -> torch.Tensor:
    """The rows of ``parameter`` this rank holds (all of a plain tensor), sharing storage."""
    return local_row_block(parameter.detach())[0]


def _other_trainable_params(optimizer, layers: dict[str, LoRASCLinear]) -> list[nn.Parameter]:
    """The trainable parameters ``optimizer`` holds besides the fast LoRAs, each once."""
    fast = {id(p) for layer in layers.values() for p in (layer.lora_A, layer.lora_B)}
    others = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if parameter.requires_grad and id(parameter) not in fast:
                others.setdefault(id(parameter), parameter)
    return list(others.values())


def _update_on_cpu(layer: LoRASCLinear, coeff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(coeff · B, A)`` of ``layer`` as new float32 CPU tensors."""
    lora_b = full_tensor(layer.lora_B.detach()).to("cpu", torch.float32) * coeff
    lora_a = full_tensor(layer.lora_A.detach()).to("cpu", torch.float32, copy=True)
    return lora_b, lora_a


def _check_optimizer(optimizer, layers: dict[str, LoRASCLinear]) -> None:
    """``optimizer`` must look like a torch optimizer and hold every fast LoRA parameter."""
    if not hasattr(optimizer, "state") or not hasattr(optimizer, "param_groups"):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer (with state and param_groups), "
            f"got {type(optimizer).__name__}"
        )
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name, layer in layers.items():
        for kind, parameter in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
            if id(parameter) not in held:
                raise ValueError(
                    f"optimizer does not hold {name or 'model'}.{kind}: build the optimizer "
                    "after inject_lorasc, over the model's trainable parameters"
                )
