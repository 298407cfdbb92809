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

Resuming from a Trainer checkpoint is not supported: the checkpoint's weights already
carry the noise that building a new Cascade would inject again.
"""

from __future__ import annotations

from dataclasses import asdict

from .cascade import Cascade, CascadeSettings

try:
    from transformers import TrainerCallback
except ImportError as error:
    raise ImportError(
        "LoRASCCallback needs the transformers package: pip install transformers"
    ) from error

__all__ = ["LoRASCCallback"]


class LoRASCCallback(TrainerCallback):
    """A ``TrainerCallback`` running the LoRASC schedule; takes :class:`Cascade`'s settings.

    ``cascade`` is None until training begins, then the running :class:`Cascade`.
    """

    def __init__(self, **settings):
        self.settings = CascadeSettings(**settings)
        self.cascade: Cascade | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.cascade is None:
            if model is None or optimizer is None:
                raise RuntimeError("the Trainer passed no model or optimizer to on_train_begin")
            self.cascade = Cascade(model, optimizer, **asdict(self.settings))

    def on_step_end(self, args, state, control, **kwargs):
        self.cascade.step()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.cascade.end_epoch()
