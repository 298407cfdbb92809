"""``LoRASCCallback``: drives a :class:`~lorasc_kernels.Cascade` inside a Hugging Face ``Trainer``.

The ``Trainer`` builds its optimizer only when training starts, so the callback takes the
Cascade's settings and builds the Cascade in ``on_train_begin`` from the model and the
optimizer the Trainer hands its callbacks. Then ``on_optimizer_step`` (after each optimizer
step, so once per ``gradient_accumulation_steps`` micro-batches, and before the Trainer
steps its LR scheduler) calls ``cascade.step()`` and ``on_epoch_end`` calls
``cascade.end_epoch()``; the schedule (``steps_per_cascade`` or one cascade per epoch)
decides which one ends a cascade::

    callback = LoRASCCallback(steps_per_cascade=500, slow_rate=0.5)
    trainer = Trainer(model, args, train_dataset=data, callbacks=[callback])
    callback.first_in(trainer)       # optional: W&B / TensorBoard get the cascade figures
    trainer.train()
    model = callback.cascade.finalize()

Logs: after each boundary the callback asks the Trainer to log and adds
``cascade.last_boundary`` (``lorasc/cascade``, ``lorasc/merge_ms``, ...) to the next log
in ``on_log`` (and to ``state.log_history``). The Trainer calls ``on_log`` on the reporting
callbacks of ``report_to`` before the user's callbacks, so those see the figures only
when this callback comes first: :meth:`LoRASCCallback.first_in`.

Warm-up: with ``warmup_steps > 0`` the callback wraps the Trainer's scheduler (a
``LambdaLR``: every ``lr_scheduler_type`` but ``reduce_lr_on_plateau``, or the one passed
in ``optimizers=``) with :meth:`Cascade.lr_lambda`, so the learning rate is
``schedule(step) · lr_factor()``.

Checkpoints: the callback writes the Cascade's state as ``lorasc_cascade.pt`` into the
checkpoint folder (``lorasc_cascade.rank<i>.pt`` from each process of a distributed
run), atomically, when the step or epoch that saves ends, before the Trainer writes its own
files and removes old checkpoints (``save_total_limit``); ``on_save`` writes it for a save
decided later (``save_strategy="best"``), and then ``lorasc_cascade.binding.json``: the
digests of those files and of the Trainer's ``trainer_state.json``, so that a checkpoint
mixing two saves is refused on resume. The Trainer does not tell its callbacks which
checkpoint it resumes from, so ``on_train_begin`` looks in ``args.resume_from_checkpoint``
when it is set (pass ``TrainingArguments(resume_from_checkpoint=path)`` for a checkpoint
outside ``output_dir``), else in ``<output_dir>/checkpoint-<step>`` (``resume_from_checkpoint=True``
and checkpoints of ``output_dir``), and continues the run from that file with
:meth:`Cascade.from_state_dict` (the loaded weights already carry the noise).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from .. import _checks as checks
from .._files import atomic_write, file_digest
from ..cascade.driven import driven_layers
from ..cascade.metrics import DEFAULT_EVERY
from ..cascade.schedule import Cascade
from ..cascade.settings import CascadeSettings
from ..cascade.state import upgraded
from ..distributed import unwrap_data_parallel
from .peft import PeftLoraLayer, base_weights, load_base_weights, peft_lora_layers

try:
    from transformers import DefaultFlowCallback, TrainerCallback
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as error:
    raise ImportError(
        "LoRASCCallback needs the transformers package: pip install transformers"
    ) from error

__all__ = ["CHECKPOINT_FILE", "LoRASCCallback"]

logger = logging.getLogger("lorasc_kernels")

CHECKPOINT_FILE = "lorasc_cascade.pt"
# Beside it, for a PEFT model: the merged base weights (the Trainer saves the adapters only).
PEFT_BASE_SUFFIX = ".peft_base.pt"
# The key of the Cascade's state file naming that file by its digest (the pair is one unit).
PAIR_KEY = "lorasc_callback_peft_base"
# Beside them, written after the Trainer's own files: the digests that bind them all.
BINDING_SUFFIX = ".binding.json"


def _checkpoint_file(args, state, folder=None) -> Path:
    """Where a checkpoint keeps the Cascade's state: in ``folder``, by default the Trainer's
    checkpoint of the current global step; one file per process when there are several
    (under FSDP2 the anchors of the slow update are each rank's own rows),
    ``lorasc_cascade.rank<i>.pt``."""
    name = (
        CHECKPOINT_FILE
        if args.world_size <= 1
        else CHECKPOINT_FILE.replace(".pt", f".rank{args.process_index}.pt")
    )
    if folder is None:
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    return Path(folder) / name


def _binding(path: Path) -> Path:
    """The file binding the Cascade's state ``path`` to the Trainer's files beside it."""
    return path.with_name(path.name.replace(".pt", BINDING_SUFFIX))


def _bind(path: Path, known: dict[str, str]) -> None:
    """Write :func:`_binding` of ``path``: the SHA-256 of the Cascade's state, its companion
    (PEFT route) and the Trainer's ``trainer_state.json`` as saved now, after the Trainer's
    own files (``on_save``); ``known``: digests already taken of files unchanged since."""
    folder = path.parent
    names = [path.name, _companion(path).name, TRAINER_STATE_NAME]
    digests = {
        name: known.get(name) or file_digest(folder / name)
        for name in names
        if (folder / name).is_file()
    }
    atomic_write(_binding(path), lambda file: file.write_text(json.dumps(digests, indent=1)))


def _check_binding(path: Path) -> set[str]:
    """Refuse a checkpoint whose files are not those its :func:`_binding` names (written by
    different saves: a run re-started from an earlier checkpoint and killed while it saved
    over a later one); returns the names of the files it verified. A checkpoint without one
    (saved before bindings, or cut off before ``on_save``) is taken as it is."""
    binding = _binding(path)
    if not binding.is_file():
        return set()
    try:
        digests = json.loads(binding.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{binding} cannot be read ({type(error).__name__}: {error})") from error
    stale = [
        name
        for name, digest in digests.items()
        if not (path.parent / name).is_file() or file_digest(path.parent / name) != digest
    ]
    if stale:
        raise ValueError(
            f"{path.parent}: {stale} are not the files {binding.name} was saved with: the "
            "checkpoint mixes two saves (e.g. a run re-started from an earlier checkpoint and "
            "killed while saving over this one); resume from another checkpoint"
        )
    return set(digests)


def _companion(path: Path) -> Path:
    """The file of a PEFT run's merged base weights beside the Cascade's state ``path``."""
    return path.with_name(path.name.replace(".pt", PEFT_BASE_SUFFIX))


def _read(path: Path, what: str):
    """``torch.load`` of ``path`` (tensors and plain data only); an unreadable file raises
    ``ValueError`` naming ``what`` and the path."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, EOFError, RuntimeError...
        raise ValueError(
            f"{what} in {path} cannot be read ({type(error).__name__}: {error})"
        ) from error


class LoRASCCallback(TrainerCallback):
    """A ``TrainerCallback`` running the LoRASC schedule; takes :class:`Cascade`'s settings.

    ``cascade`` is the running :class:`Cascade` once training has begun (``started``);
    before that, reading it (or an event that drives it: ``on_optimizer_step``,
    ``on_epoch_end``, ``on_save``) raises ``RuntimeError``. A second ``trainer.train()``
    continues the same Cascade on the same model (with the Trainer's optimizer); another
    model, or a finalized Cascade, is refused.
    ``metrics_every`` and ``metrics_layer`` go to :meth:`Cascade.track_metrics` (its default:
    every :data:`~lorasc_kernels.cascade.metrics.DEFAULT_EVERY`-th boundary).
    """

    def __init__(
        self, *, metrics_every: int = DEFAULT_EVERY, metrics_layer: str | None = None, **settings
    ):
        self.settings = CascadeSettings(**settings)
        checks.check_int("metrics_every", metrics_every, 0)
        if metrics_layer is not None and not isinstance(metrics_layer, str):
            raise TypeError(
                f"metrics_layer must be a layer's module path or None, "
                f"got {type(metrics_layer).__name__}"
            )
        self.metrics_every, self.metrics_layer = metrics_every, metrics_layer
        self._cascade: Cascade | None = None
        self._pending = False  # whether the last boundary's figures wait to be logged
        self._first = False  # whether first_in() put this callback ahead of the reporters
        self._warmed_scheduler = None  # the LambdaLR wrapped with the warm-up
        self._written_step = None  # the global step whose checkpoint files were written
        self._written_digests: dict[str, str] = {}  # and the digests taken of them then

    def first_in(self, trainer) -> None:
        """Put this callback first in ``trainer``'s callbacks (adding it if absent), so that
        the reporting callbacks (W&B, TensorBoard) log the cascade figures it adds; only
        the Trainer's ``DefaultFlowCallback`` stays ahead (it decides which steps save)."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        # after the Trainer's flow callback, which decides whether a step saves
        flow = [i for i, c in enumerate(callbacks) if isinstance(c, DefaultFlowCallback)]
        callbacks.insert(flow[0] + 1 if flow else 0, self)
        self._first = True

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
        scheduler = kwargs.get("lr_scheduler")
        warmed = self._warmup_scheduler(scheduler)  # refused before the Cascade is built
        self._check_metrics_layer(model)  # before the Cascade writes the first noise
        if state.global_step == 0:
            cascade = Cascade(model, optimizer, settings=self.settings)
        else:
            cascade = self._resumed_cascade(args, state, model, optimizer)
        cascade.track_metrics(self.metrics_every, self.metrics_layer)
        self._cascade = cascade
        if warmed is not None:
            self._wire_warmup(warmed)
            self._warmed_scheduler = scheduler
        reporters = [name for name in args.report_to or [] if name != "none"]
        if reporters and not self._first:
            logger.warning(
                "report_to=%s: the Trainer calls those callbacks before "
                "LoRASCCallback, so they log the cascade figures only after "
                "callback.first_in(trainer)",
                reporters,
            )

    def _check_metrics_layer(self, model) -> None:
        """``metrics_layer`` names one of the layers a Cascade on ``model`` would drive."""
        names = list(driven_layers(unwrap_data_parallel(model)))
        if self.metrics_layer is not None and self.metrics_layer not in names:
            raise ValueError(
                f"LoRASCCallback(metrics_layer={self.metrics_layer!r}) is not one of the "
                f"model's driven layers {names}; nothing was changed"
            )

    def _warmup_scheduler(self, scheduler):
        """The ``LambdaLR`` (inside accelerate's wrapper) the warm-up must wrap, or None when
        there is no warm-up or it is wrapped already; refuses another kind of scheduler."""
        if self.settings.warmup_steps == 0 or scheduler is self._warmed_scheduler:
            return None
        inner = getattr(scheduler, "scheduler", scheduler)
        if not isinstance(inner, torch.optim.lr_scheduler.LambdaLR):
            raise ValueError(
                f"warmup_steps={self.settings.warmup_steps} needs the Trainer's LR scheduler to "
                f"be a LambdaLR, got {type(inner).__name__}: use an lr_scheduler_type other "
                "than reduce_lr_on_plateau, or pass optimizers=(optimizer, LambdaLR(...))"
            )
        return inner

    def _wire_warmup(self, scheduler) -> None:
        """Wrap ``scheduler``'s multipliers with :meth:`Cascade.lr_lambda` and set the
        learning rates they give now (the Trainer computed the first without the warm-up)."""
        scheduler.lr_lambdas = [self.cascade.lr_lambda(f) for f in scheduler.lr_lambdas]
        groups = scheduler.optimizer.param_groups
        for group, base, multiplier in zip(
            groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base * multiplier(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports

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
        """The Cascade saved with the checkpoint the Trainer resumed from: in
        ``args.resume_from_checkpoint`` if set, else in ``output_dir``'s checkpoint of this
        step; a step schedule's state must be at the Trainer's step."""
        hint = args.resume_from_checkpoint
        path = _checkpoint_file(args, state, hint if isinstance(hint, (str, Path)) else None)
        if not path.is_file():
            raise RuntimeError(
                f"resuming at step {state.global_step} needs the Cascade's state in {path}, "
                "which does not exist. The Trainer does not tell callbacks which checkpoint it "
                "resumes from: for a checkpoint outside output_dir, also set "
                "TrainingArguments(resume_from_checkpoint=<the same path>); the checkpoint "
                "must have been saved with LoRASCCallback"
            )
        verified = _check_binding(path)
        saved = _read(path, "the Cascade's state")
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
        steps = self.settings.steps_per_cascade
        if (
            steps is not None
            and isinstance(saved.get("cascade_index"), int)
            and isinstance(saved.get("steps_in_cascade"), int)
        ):
            at = saved["cascade_index"] * steps + saved["steps_in_cascade"]
            if at != state.global_step:
                raise ValueError(
                    f"the Cascade's state in {path} is at optimizer step {at}, the Trainer "
                    f"resumes at step {state.global_step}: point "
                    "TrainingArguments.resume_from_checkpoint at the checkpoint passed to "
                    "train()"
                )
        pair = saved.pop(PAIR_KEY, None)
        layers = peft_lora_layers(model)
        if layers:  # the PEFT route: the callback saved the merged base weights too
            weights = _companion(path)
            if not weights.is_file():
                raise RuntimeError(
                    f"resuming a PEFT model's run needs its merged base weights "
                    f"in {weights}, saved by LoRASCCallback beside {path.name}"
                )
            if (
                pair is not None
                and weights.name not in verified  # else checked with the binding already
                and pair.get("sha256") != file_digest(weights)
            ):
                raise ValueError(
                    f"{weights} is not the file {path} was saved with (its SHA-256 differs): "
                    "the two were written by different saves, e.g. a save cut off after "
                    "the base weights; resume from another checkpoint"
                )
            saved_weights = _read(weights, "the merged base weights")
            before = base_weights(layers)  # put back if the Cascade's state is refused
            load_base_weights(layers, saved_weights, str(weights))
        try:
            return Cascade.from_state_dict(model, optimizer, saved)
        except (TypeError, ValueError) as error:
            if layers:
                load_base_weights(layers, before, "the base weights before resuming")
            raise type(error)(f"the Cascade's state in {path}: {error}") from error

    def on_save(self, args, state, control, **kwargs):
        cascade = self.cascade  # refuses before training began
        if self._written_step != state.global_step:  # else written before the Trainer's
            self._write_checkpoint(args, state, cascade)
        if args.world_size > 1 or state.is_world_process_zero:
            _bind(_checkpoint_file(args, state), self._written_digests)

    def _write_checkpoint(self, args, state, cascade: Cascade) -> None:
        """The Cascade's state (and, on the PEFT route, the merged base weights) into the
        checkpoint of ``state.global_step``, each file atomically."""
        self._written_step, self._written_digests = state.global_step, {}
        if not (args.world_size > 1 or state.is_world_process_zero):
            return
        path = _checkpoint_file(args, state)
        path.parent.mkdir(parents=True, exist_ok=True)
        saved = cascade.state_dict()
        if all(isinstance(layer, PeftLoraLayer) for layer in cascade.layers.values()):
            # the base weights first; the state, written last, names them by digest
            weights = base_weights(cascade.layers)
            companion = atomic_write(_companion(path), lambda file: torch.save(weights, file))
            digest = self._written_digests[companion.name] = file_digest(companion)
            saved[PAIR_KEY] = {"name": companion.name, "sha256": digest}
        atomic_write(path, lambda file: torch.save(saved, file))

    def _write_before_the_trainer(self, args, state, control) -> None:
        """When this step or epoch ends in a save, write the callback's files now: the
        Trainer removes old checkpoints (``save_total_limit``) before it calls ``on_save``,
        and the newest must be complete before an older one goes."""
        if control.should_save:
            self._write_checkpoint(args, state, self.cascade)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.cascade.step():
            self._pending = True  # its figures are read when logged (no wait for the GPU now)

    def on_step_end(self, args, state, control, **kwargs):
        if self._pending:
            control.should_log = True  # the Trainer logs this step, with the figures
        self._write_before_the_trainer(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.cascade.end_epoch():
            self._pending = True
            control.should_log = True
        self._write_before_the_trainer(args, state, control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending or logs is None:
            return
        figures = self.cascade.last_boundary
        logs.update(figures)
        if state.log_history:  # the Trainer recorded this log before calling on_log
            state.log_history[-1].update(figures)
        self._pending = False
