"""The LoRASC schedule: :class:`Cascade` over a model's driven layers.

* ``schedule``: :class:`Cascade` (steps, boundaries, finalize, state, exports' entry points);
* ``settings``: :class:`CascadeSettings`, checked once; ``state``: the saved state, its
  version and checks; ``history``: the merged updates kept in memory or on disk;
* ``merges``: a boundary's merges, checked before any runs, on every rank;
* ``export``: the merged state dict, its safetensors files, the PEFT adapter;
* ``metrics``: the boundary figures; ``lowrank``: the low-rank sums they and the exports use;
* ``optimizers``: which optimizers' fast-LoRA state a boundary drops; ``slow_update``: the
  other trained parameters' slow update;
* ``driven``: :class:`DrivenLayer`, what a layer offers to be driven.
"""

from .driven import DrivenLayer
from .schedule import Cascade, cascade_seed, driven_layers
from .settings import CascadeSettings

__all__ = ["Cascade", "CascadeSettings", "DrivenLayer", "cascade_seed", "driven_layers"]
