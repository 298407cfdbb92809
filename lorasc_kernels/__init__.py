"""lorasc_kernels: fused kernels and a drop-in ``nn.Linear`` for LoRASC (arXiv 2407.01491)."""

from .functional import lorasc_linear, merge_lowrank_
from .inject import LoRASCConfig, inject_lorasc
from .modules import LoRASCLinear

__all__ = [
    "LoRASCLinear",
    "LoRASCConfig",
    "inject_lorasc",
    "lorasc_linear",
    "merge_lowrank_",
]

__version__ = "0.1.0"
