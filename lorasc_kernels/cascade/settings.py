"""``CascadeSettings``: the settings of a :class:`~lorasc_kernels.Cascade`, checked once.

Why the defaults are what they are, measured: ``docs/method.md``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from .. import _checks as checks
from ..formats.rounding import ROUNDING_MODES

__all__ = ["NOISE_MODES", "MAX_INPLACE_NOISE_LAMBDA", "CascadeSettings"]

NOISE_MODES = ("inplace", "fused", "off")
# Larger in-place noise swamps W: each removal rounds W at the noise's magnitude.
MAX_INPLACE_NOISE_LAMBDA = 1.0


@dataclass(frozen=True)
class CascadeSettings:
    """How a :class:`~lorasc_kernels.Cascade` runs; every value checked on creation.

    Attributes:
        steps_per_cascade: cascade length in ``step()`` calls; None: one cascade per epoch,
            ended by ``end_epoch()``.
        slow_rate: the portion α in (0, 1] of each fast LoRA folded into ``W`` (the paper's
            slow-fast update: 0.5).
        noise_lambda: noise scale relative to each matrix's std (NoisyTune's λ; the paper's
            cascading noisy tuning: 0.15); 0: no noise and no noise work. At most
            ``MAX_INPLACE_NOISE_LAMBDA`` in ``"inplace"`` mode.
        noise_mode: ``"inplace"`` (noise written into ``W``), ``"fused"`` (added by the
            kernels, ``W`` untouched; float weights only) or ``"off"``.
        seed: root of every seed the schedule derives.
        keep_history: keep each merged ``(slow_rate·s·B_t, A_t)`` on the CPU in float32,
            for ``export_peft_adapter`` and ``lorasc/effective_rank``.
        history_dir: with ``keep_history``, a folder to keep them in (one file per layer,
            appended at each boundary; :mod:`~lorasc_kernels.cascade.history`) instead of
            memory; the state dict then holds their digests, not the tensors. None: memory.
        rounding: rounding of the merges into ``W``'s dtype, ``"stochastic"`` or ``"nearest"``.
        slow_other_params: give the other trainable parameters the optimizer holds (a new
            head, norms, biases) the same slow update at each boundary
            (:class:`~lorasc_kernels.cascade.slow_update.SlowUpdate`).
        warmup_steps: length of the linear learning-rate warm-up at the start of every
            cascade (0: none), applied through ``Cascade.lr_lambda``.
    """

    steps_per_cascade: int | None = None
    slow_rate: float = 1.0
    noise_lambda: float = 0.0
    noise_mode: str = "inplace"
    seed: int = 0
    keep_history: bool = False
    history_dir: str | None = None
    rounding: str = "stochastic"
    slow_other_params: bool = True
    warmup_steps: int = 0

    def __post_init__(self):
        def keep(name: str, value) -> None:  # the checked value: numpy scalars become Python's
            object.__setattr__(self, name, value)

        if self.steps_per_cascade is not None:
            keep(
                "steps_per_cascade",
                checks.check_int("steps_per_cascade", self.steps_per_cascade, 1),
            )
        keep("slow_rate", checks.check_float("slow_rate", self.slow_rate))
        if not 0.0 < self.slow_rate <= 1.0:
            raise ValueError(f"slow_rate must be in (0, 1], got {self.slow_rate}")
        keep("noise_lambda", checks.check_float("noise_lambda", self.noise_lambda, minimum=0.0))
        checks.check_choice("noise_mode", self.noise_mode, NOISE_MODES)
        if self.noise_mode == "inplace" and self.noise_lambda > MAX_INPLACE_NOISE_LAMBDA:
            raise ValueError(
                f"noise_lambda={self.noise_lambda:g} with noise_mode='inplace' writes noise "
                f"{self.noise_lambda:.3g}× the weights' std into W, and removing it rounds W "
                f"away; at most {MAX_INPLACE_NOISE_LAMBDA} (the paper's is 0.15), or use "
                "noise_mode='fused', which leaves W clean"
            )
        keep("seed", checks.check_seed("seed", self.seed))
        if not isinstance(self.keep_history, bool):
            raise TypeError(f"keep_history must be a bool, got {type(self.keep_history).__name__}")
        if self.history_dir is not None:
            if not isinstance(self.history_dir, (str, os.PathLike)):
                raise TypeError(
                    "history_dir must be None or a folder's path, got "
                    f"{type(self.history_dir).__name__}"
                )
            keep("history_dir", os.fspath(self.history_dir))
            if not isinstance(self.history_dir, str) or not self.history_dir:
                raise ValueError(f"history_dir must be a folder's path, got {self.history_dir!r}")
            if not self.keep_history:
                raise ValueError("history_dir keeps the history on disk: set keep_history=True")
        checks.check_choice("rounding", self.rounding, ROUNDING_MODES)
        if not isinstance(self.slow_other_params, bool):
            raise TypeError(
                f"slow_other_params must be a bool, got {type(self.slow_other_params).__name__}"
            )
        keep(
            "warmup_steps",
            checks.check_int("warmup_steps", self.warmup_steps, 0, self.steps_per_cascade),
        )

    @classmethod
    def of(cls, settings: CascadeSettings | None = None, **overrides) -> CascadeSettings:
        """``settings`` (the defaults if None) with ``overrides`` replacing some values; an
        unknown name raises ``TypeError`` naming it."""
        if settings is not None and not isinstance(settings, cls):
            raise TypeError(
                f"settings must be a CascadeSettings or None, got {type(settings).__name__}"
            )
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown Cascade settings {unknown}; the settings are {sorted(names)}")
        return dataclasses.replace(settings or cls(), **overrides)

    @property
    def applied_noise_mode(self) -> str:
        """``noise_mode``, or ``"off"`` when ``noise_lambda`` is 0 (no noise, no noise work)."""
        return "off" if self.noise_lambda == 0.0 else self.noise_mode
