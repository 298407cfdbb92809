"""lorasc_kernels: fused kernels and a drop-in ``nn.Linear`` for LoRASC (arXiv 2407.01491).

The public API, every name the README documents: the layer, its injection, the schedule,
the functional calls, fp8 weights and layers, the Trainer callback (imported on first use:
it needs ``transformers``) and the :mod:`.distributed` helpers.
"""

from . import distributed
from .cascade import Cascade, CascadeSettings
from .formats.scaled_weight import ScaledWeight
from .fp8_linear import Fp8Linear
from .functional import lorasc_linear
from .inject import LoRASCConfig, inject_lorasc
from .layer import LoRASCLinear
from .merge import merge_lowrank_

__all__ = [
    "LoRASCLinear",
    "LoRASCConfig",
    "inject_lorasc",
    "Cascade",
    "CascadeSettings",
    "LoRASCCallback",
    "lorasc_linear",
    "merge_lowrank_",
    "ScaledWeight",
    "Fp8Linear",
    "distributed",
]

__version__ = "0.1.0"


def __getattr__(name: str):
    # LoRASCCallback imports transformers: only on first use, so it stays optional.
    if name == "LoRASCCallback":
        from .integrations.hf_callback import LoRASCCallback

        return LoRASCCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
