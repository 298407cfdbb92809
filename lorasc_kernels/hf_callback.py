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
checkpoint folder, and when ``trainer.train(resume_from_checkpoint=...)`` resumes from
``<output_dir>/checkpoint-<step>``, ``on_train_begin`` continues the run from that file
with :meth:`Cascade.from_state_dict` (the loaded weights already carry the noise).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from .cascade import Cascade, CascadeSettings

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as error:
    raise ImportError(
        "LoRASCCallback needs the transformers package: pip install transformers"
    ) from error

__all__ = ["CHECKPOINT_FILE", "LoRASCCallback"]

CHECKPOINT_FILE = "lorasc_cascade.pt"


def _checkpoint_file(args, state) -> Path:
    """Where the Trainer's checkpoint of the current global step keeps the Cascade's state."""
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / CHECKPOINT_FILE


class LoRASCCallback(TrainerCallback):
    """A ``TrainerCallback`` running the LoRASC schedule; takes :class:`Cascade`'s settings.

    ``cascade`` is None until training begins, then the running :class:`Cascade`.
    """

    def __init__(self, **settings):
        self.settings = CascadeSettings(**settings)
        self.cascade: Cascade | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.cascade is not None:
            return
        if model is None or optimizer is None:
            raise RuntimeError("the Trainer passed no model or optimizer to on_train_begin")
        if state.global_step == 0:
            self.cascade = Cascade(model, optimizer, **asdict(self.settings))
        else:
            self.cascade = self._resumed_cascade(args, state, model, optimizer)

    def _resumed_cascade(self, args, state, model, optimizer) -> Cascade:
        """The Cascade saved with the checkpoint the Trainer resumed from."""
        path = _checkpoint_file(args, state)
        if not path.is_file():
            raise RuntimeError(
                f"resuming at step {state.global_step} needs the Cascade's state in {path}; "
                "resume from a checkpoint of output_dir saved with LoRASCCallback"
            )
        saved = torch.load(path, weights_only=True)
        if saved["settings"] != asdict(self.settings):
            raise ValueError(
                f"the checkpoint's Cascade ran with {saved['settings']}, this callback has "
                f"{asdict(self.settings)}"
            )
        return Cascade.from_state_dict(model, optimizer, saved)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            torch.save(self.cascade.state_dict(), _checkpoint_file(args, state))

    def on_step_end(self, args, state, control, **kwargs):
        self.cascade.step()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.cascade.end_epoch()
