"""Deprecated (removed in the next release): ``LoRASCLinear`` lives in :mod:`lorasc_kernels.layer`
and is exported as ``lorasc_kernels.LoRASCLinear``."""

import warnings

from .layer import LoRASCLinear

__all__ = ["LoRASCLinear"]

warnings.warn(
    "lorasc_kernels.modules is deprecated: import LoRASCLinear from lorasc_kernels",
    DeprecationWarning,
    stacklevel=2,
)
