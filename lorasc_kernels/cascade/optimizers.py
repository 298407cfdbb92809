"""Which optimizers train a Cascade's fast LoRAs, so that each boundary drops their state.

The Cascade's own optimizer is handed over explicitly (construction, ``use_optimizer``);
any other ``torch.optim.Optimizer`` that steps a fast LoRA parameter (one built after the
Cascade) is noticed by a process-wide step hook, so no moments of one fast LoRA carry over
to the next.
"""

from __future__ import annotations

import functools
import threading
import weakref

from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..layer import LoRASCLinear

__all__ = ["OptimizerTracker", "check_optimizer", "other_trainable_params"]

# The started trackers. One step hook, registered by the first start() and never removed,
# notes every step for all of them: removing a hook from a tracker's finalizer could run
# inside torch's loop over the hooks (a garbage collection there) and break that loop.
_TRACKERS: weakref.WeakSet = weakref.WeakSet()
# Guards _TRACKERS, _GENERATION and _SEEN: threads build, finalize and step at once.
_LOCK = threading.Lock()
# Bumped by each start(): a new tracker must see every optimizer once.
_GENERATION = 0
# Optimizer → (parameters it held, generation) when every tracker last saw it: a step of an
# optimizer unchanged since then has nothing new to tell any tracker.
_SEEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _note_step(optimizer, *_) -> None:
    held = sum(len(group["params"]) for group in optimizer.param_groups)
    with _LOCK:
        if _SEEN.get(optimizer) == (held, _GENERATION):
            return
        _SEEN[optimizer] = (held, _GENERATION)
        trackers = list(_TRACKERS)  # a snapshot: other threads may add or remove
    for tracker in trackers:
        tracker._note(optimizer)


@functools.cache
def _register_hook():
    """The step hook, registered once (at the first start()) and kept."""
    return register_optimizer_step_post_hook(_note_step)


def fast_param_ids(layers: dict[str, LoRASCLinear]) -> set[int]:
    """``id`` of every fast LoRA parameter (``lora_A``, ``lora_B``) of ``layers``."""
    return {id(p) for layer in layers.values() for p in (layer.lora_A, layer.lora_B)}


def other_trainable_params(optimizer, layers: dict[str, LoRASCLinear]) -> list[nn.Parameter]:
    """The trainable parameters ``optimizer`` holds besides the fast LoRAs, each once."""
    fast = fast_param_ids(layers)
    others = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if parameter.requires_grad and id(parameter) not in fast:
                others.setdefault(id(parameter), parameter)
    return list(others.values())


def check_optimizer(optimizer, layers: dict[str, LoRASCLinear]) -> None:
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


class OptimizerTracker:
    """The optimizer of ``layers``' fast LoRAs (``optimizer``, checked) and every other
    optimizer seen stepping one of them, once :meth:`start` has run."""

    def __init__(self, optimizer, layers: dict[str, LoRASCLinear]):
        check_optimizer(optimizer, layers)
        self.optimizer = optimizer
        self.layers = layers
        self._others = weakref.WeakSet()
        # Optimizers holding no fast LoRA parameter, with how many parameters they held.
        self._unrelated = weakref.WeakKeyDictionary()

    def start(self) -> None:
        """Note every optimizer step from now on, until :meth:`stop` or the tracker is gone."""
        global _GENERATION
        _register_hook()
        with _LOCK:
            _TRACKERS.add(self)
            _GENERATION += 1

    def stop(self) -> None:
        with _LOCK:
            _TRACKERS.discard(self)

    def drop_state(self, layer: LoRASCLinear) -> None:
        """Drop ``layer``'s fast LoRA state from every tracked optimizer."""
        for optimizer in (self.optimizer, *self._others):
            for parameter in (layer.lora_A, layer.lora_B):
                optimizer.state.pop(parameter, None)

    def _note(self, optimizer) -> None:
        """Keep an optimizer other than :attr:`optimizer` that steps a fast LoRA parameter."""
        own = self.optimizer
        while own is not None:  # the tracked optimizer, or the one a wrapper holds
            if own is optimizer:
                return
            own = getattr(own, "optimizer", None)
        if optimizer in self._others:
            return
        held = sum(len(group["params"]) for group in optimizer.param_groups)
        if self._unrelated.get(optimizer) == held:  # seen, and no group added since
            return
        fast = fast_param_ids(self.layers)
        if any(id(p) in fast for group in optimizer.param_groups for p in group["params"]):
            self._others.add(optimizer)
        else:
            self._unrelated[optimizer] = held
