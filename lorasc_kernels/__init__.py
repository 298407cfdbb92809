"""lorasc_kernels: fused kernels and a drop-in ``nn.Linear`` for LoRASC (arXiv 2407.01491)."""

from .cascade import Cascade
from .cascade_settings import CascadeSettings
from .functional import lorasc_linear, merge_lowrank_
from .inject import LoRASCConfig, inject_lorasc
from .modules import LoRASCLinear
from .scaled_weight import ScaledWeight

__all__ = [
    "LoRASCLinear",
    "LoRASCConfig",
    "inject_lorasc",
    "Cascade",
    "CascadeSettings",
    "lorasc_linear",
    "merge_lowrank_",
    "ScaledWeight",
]

__version__ = "0.1.0"


def __getattr__(name: str):
    # LoRASCCallback imports transformers: only on first use, so it stays optional.
    if name == "LoRASCCallback":
        from .hf_callback import LoRASCCallback

        return LoRASCCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
