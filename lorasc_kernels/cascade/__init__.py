"""The LoRASC schedule: :class:`Cascade` over a model's driven layers.

* ``schedule``: :class:`Cascade` (its construction, steps, finalize, state, the exports'
  entry points); ``boundary``: its boundaries (seeds, noise, merge requests, the resumable
  run), the base class of ``Cascade``;
* ``settings``: :class:`CascadeSettings`, checked once; ``state``: the saved state, its
  version and checks; ``history``: the merged updates kept in memory or on disk;
* ``merges``: a boundary's merges, checked before any runs, on every rank;
* ``export``: the merged state dict, its safetensors files, the PEFT adapter;
* ``metrics``: the boundary figures; ``lowrank``: the low-rank sums they and the exports use;
* ``optimizers``: which optimizers' fast-LoRA state a boundary drops; ``slow_update``: the
  other trained parameters' slow update;
* ``driven``: :class:`DrivenLayer`, what a layer offers to be driven, and
  :func:`driven_layers`, the layers of a model a Cascade drives.
"""

from .boundary import cascade_seed
from .driven import DrivenLayer, driven_layers
from .schedule import Cascade
from .settings import CascadeSettings

__all__ = ["Cascade", "CascadeSettings", "DrivenLayer", "cascade_seed", "driven_layers"]
