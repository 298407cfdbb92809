"""A Cascade's saved state: its entries, its version, older states upgraded, and the checks
that run before any entry is taken.

``state_dict()`` writes every key of :data:`STATE_KEYS`; ``version`` is
:data:`STATE_VERSION`. A state written before states had a version (version 0, with every
other key) loads as it is. A setting added since a state was written takes its default, so
a new setting never makes an older checkpoint unloadable, except those W's noise depends on
(:data:`SETTINGS_IN_W`), which are refused by name when missing; a state of a newer version
is refused.
"""

from __future__ import annotations

import dataclasses

from .. import _checks as checks
from .history import check_saved_history
from .settings import CascadeSettings

__all__ = ["STATE_VERSION", "STATE_KEYS", "upgraded", "check_state"]

STATE_VERSION = 1
STATE_KEYS = (
    "version",
    "settings",
    "layer_names",
    "cascade_index",
    "steps_in_cascade",
    "finalized",
    "noise_scales",
    "history",
    "anchors",
)

# The settings that decide what W holds (its in-place noise): never filled by a default.
SETTINGS_IN_W = ("noise_lambda", "noise_mode", "seed")


def upgraded(state) -> dict:
    """``state`` as :data:`STATE_VERSION` writes it (a new dict; tensors shared): its
    ``version`` set, and the settings it lacks at their defaults. Refuses what is not a
    state dict of this or an older version."""
    if not isinstance(state, dict):
        raise TypeError(
            f"state must be a dict from Cascade.state_dict(), got {type(state).__name__}"
        )
    version = state.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"state['version'] must be an int >= 0, got {version!r}")
    if version > STATE_VERSION:
        raise ValueError(
            f"state['version'] is {version}: written by a newer lorasc_kernels "
            f"(this one reads versions up to {STATE_VERSION})"
        )
    settings = state.get("settings")
    if not isinstance(settings, dict):
        raise ValueError("state must be a dict from Cascade.state_dict() with its 'settings'")
    defaults = dataclasses.asdict(CascadeSettings())
    unknown = [name for name in settings if name not in defaults]
    if unknown:
        raise TypeError(f"state['settings'] has unknown settings {unknown}")
    missing = [name for name in SETTINGS_IN_W if name not in settings]
    if missing:
        raise ValueError(
            f"state['settings'] lacks {missing}: the noise the saved W carries depends on "
            "them, so no default can stand in; pass the state as Cascade.state_dict() wrote it"
        )
    return {
        **state,
        "version": STATE_VERSION,
        "settings": {**{k: v for k, v in defaults.items() if k not in settings}, **settings},
    }


def check_state(state: dict, settings: CascadeSettings, layers: dict, anchors: list) -> None:
    """``state`` (from :func:`upgraded`) is a state of a run of these ``settings``,
    ``layers`` (by name) and slow-update ``anchors``; raises naming the first bad entry."""
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise ValueError(f"state lacks {missing}: pass a dict from Cascade.state_dict()")
    # history_dir is where the history is, not how the run runs: a moved folder loads
    if _compared(state["settings"]) != _compared(dataclasses.asdict(settings)):
        raise ValueError(
            f"state['settings'] {state['settings']} differ from this Cascade's "
            f"{dataclasses.asdict(settings)}"
        )
    if state["layer_names"] != list(layers):
        raise ValueError(
            f"state['layer_names'] {state['layer_names']} are not this model's "
            f"LoRASCLinear layers {list(layers)}"
        )
    if state["finalized"] is not False:
        raise ValueError("state['finalized'] is not False: a finalized run cannot resume")
    # a cascade index keys 32-bit seeds (cascade_seed), the next one included
    checks.check_int("state['cascade_index']", state["cascade_index"], 0, 2**32 - 2)
    steps = settings.steps_per_cascade
    checks.check_int(
        "state['steps_in_cascade']",
        state["steps_in_cascade"],
        0,
        None if steps is None else steps - 1,
    )
    scales = state["noise_scales"]
    if not isinstance(scales, (list, tuple)) or len(scales) != len(layers):
        raise ValueError(
            f"state['noise_scales'] must be a list of {len(layers)} "
            f"scales, one per layer, got {scales!r}"
        )
    for index, scale in enumerate(scales):
        checks.check_float(f"state['noise_scales'][{index}]", scale, minimum=0.0)
    check_saved_history(state["history"], layers, settings)
    _check_anchors(state["anchors"], anchors)


def _compared(settings: dict) -> dict:
    """``settings`` as two runs must share them to continue one another."""
    return {name: value for name, value in settings.items() if name != "history_dir"}


def _check_anchors(saved_anchors, anchors: list) -> None:
    """``state['anchors']``: one finite tensor like each of ``anchors``."""
    if not isinstance(saved_anchors, (list, tuple)) or len(saved_anchors) != len(anchors):
        count = len(saved_anchors) if isinstance(saved_anchors, (list, tuple)) else saved_anchors
        raise ValueError(
            f"state has {count} anchors, this Cascade slow-updates {len(anchors)} other parameters"
        )
    for index, (anchor, saved) in enumerate(zip(anchors, saved_anchors, strict=True)):
        checks.check_saved_like(f"state['anchors'][{index}]", saved, anchor)
