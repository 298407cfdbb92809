"""``LoRASCCallback``: drives a :class:`~lorasc_kernels.Cascade` inside a Hugging Face ``Trainer``.

The ``Trainer`` builds its optimizer only when training starts, so the callback takes the
Cascade's settings and builds the Cascade in ``on_train_begin`` from the model and the
optimizer the Trainer hands its callbacks. Then ``on_step_end`` (after each optimizer
step) calls ``cascade.step()`` and ``on_epoch_end`` calls ``cascade.end_epoch()``; the
schedule (``steps_per_cascade`` or one cascade per epoch) decides which one ends a cascade::

    callback = LoRASCCallback(steps_per_cascade=500, slow_rate=0.5)
    trainer = Trainer(model, args, train_dataset=data, callbacks=[callback])
    trainer.train()
    model = callback.cascade.finalize()

Checkpoints: ``on_save`` writes the Cascade's state as ``lorasc_cascade.pt`` into the
checkpoint folder (``lorasc_cascade.rank<i>.pt`` from each process of a distributed
run), and when ``trainer.train(resume_from_checkpoint=...)`` resumes from
``<output_dir>/checkpoint-<step>``, ``on_train_begin`` continues the run from that file
with :meth:`Cascade.from_state_dict` (the loaded weights already carry the noise).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from .cascade import Cascade
from .cascade_settings import CascadeSettings
from .cascade_state import upgraded
from .integrations.peft import PeftLoraLayer, base_weights, load_base_weights, peft_lora_layers

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as error:
    raise ImportError(
        "LoRASCCallback needs the transformers package: pip install transformers"
    ) from error

__all__ = ["CHECKPOINT_FILE", "LoRASCCallback"]

CHECKPOINT_FILE = "lorasc_cascade.pt"
# Beside it, for a PEFT model: the merged base weights (the Trainer saves the adapters only).
PEFT_BASE_SUFFIX = ".peft_base.pt"


def _checkpoint_file(args, state) -> Path:
    """Where the Trainer's checkpoint of the current global step keeps the Cascade's state:
    one file per process when there are several (under FSDP2 the anchors of the slow update
    are each rank's own rows), ``lorasc_cascade.rank<i>.pt``."""
    name = (CHECKPOINT_FILE if args.world_size <= 1
            else CHECKPOINT_FILE.replace(".pt", f".rank{args.process_index}.pt"))
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / name


class LoRASCCallback(TrainerCallback):
    """A ``TrainerCallback`` running the LoRASC schedule; takes :class:`Cascade`'s settings.

    ``cascade`` is the running :class:`Cascade` once training has begun (``started``);
    before that, reading it (or a Trainer event other than ``on_train_begin``) raises
    ``RuntimeError``. A second ``trainer.train()`` continues the same Cascade on the same
    model (with the Trainer's optimizer); another model, or a finalized Cascade, is refused.
    """

    def __init__(self, **settings):
        self.settings = CascadeSettings(**settings)
        self._cascade: Cascade | None = None

    @property
    def started(self) -> bool:
        """Whether training has begun, so that :attr:`cascade` exists."""
        return self._cascade is not None

    @property
    def cascade(self) -> Cascade:
        """The Cascade built when training began."""
        if self._cascade is None:
            raise RuntimeError(
                "LoRASCCallback has no Cascade yet: it is built when training begins "
                "(trainer.train() calls on_train_begin); pass the callback to the Trainer "
                "and train first"
            )
        return self._cascade

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise RuntimeError("the Trainer passed no model or optimizer to on_train_begin")
        if self._cascade is not None:
            self._check_continues(model, optimizer)
            return
        if state.global_step == 0:
            self._cascade = Cascade(model, optimizer, settings=self.settings)
        else:
            self._cascade = self._resumed_cascade(args, state, model, optimizer)

    def _check_continues(self, model, optimizer) -> None:
        """A later ``train()`` continues the running Cascade: same layers, and the
        Trainer's (maybe rebuilt) optimizer handed over with :meth:`Cascade.use_optimizer`."""
        cascade = self._cascade
        if cascade.finalized:
            raise RuntimeError(
                "this LoRASCCallback's Cascade was finalized: use a new callback for a new run"
            )
        if not cascade.runs_on(model):
            raise RuntimeError(
                "this LoRASCCallback runs a Cascade over another model than this train() "
                "call's: use a new callback for a new model"
            )
        cascade.use_optimizer(optimizer)

    def _resumed_cascade(self, args, state, model, optimizer) -> Cascade:
        """The Cascade saved with the checkpoint the Trainer resumed from."""
        path = _checkpoint_file(args, state)
        if not path.is_file():
            raise RuntimeError(
                f"resuming at step {state.global_step} needs the Cascade's state in {path}; "
                "resume from a checkpoint of output_dir saved with LoRASCCallback"
            )
        try:
            saved = torch.load(path, weights_only=True)
        except Exception as error:  # torch raises UnpicklingError, EOFError, RuntimeError...
            raise ValueError(f"the Cascade's state in {path} cannot be read "
                             f"({type(error).__name__}: {error})") from error
        try:
            saved = upgraded(saved)
        except (TypeError, ValueError) as error:
            raise ValueError(f"the Cascade's state in {path}: {error}") from error
        settings = saved["settings"]
        if settings != asdict(self.settings):
            raise ValueError(
                f"the checkpoint's Cascade ran with {settings} ({path}), this callback has "
                f"{asdict(self.settings)}"
            )
        layers = peft_lora_layers(model)
        if layers:  # the PEFT route: the Trainer saved the adapters, not the merged weights
            weights = path.with_name(path.name.replace(".pt", PEFT_BASE_SUFFIX))
            if not weights.is_file():
                raise RuntimeError(f"resuming a PEFT model's run needs its merged base weights "
                                   f"in {weights}, saved by LoRASCCallback beside {path.name}")
            load_base_weights(layers, torch.load(weights, weights_only=True), str(weights))
        return Cascade.from_state_dict(model, optimizer, saved)

    def on_save(self, args, state, control, **kwargs):
        cascade = self.cascade  # refuses before training began
        if args.world_size > 1 or state.is_world_process_zero:
            path = _checkpoint_file(args, state)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(cascade.state_dict(), path)
            if all(isinstance(layer, PeftLoraLayer) for layer in cascade.layers.values()):
                torch.save(base_weights(cascade.layers),
                           path.with_name(path.name.replace(".pt", PEFT_BASE_SUFFIX)))

    def on_step_end(self, args, state, control, **kwargs):
        self.cascade.step()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.cascade.end_epoch()
