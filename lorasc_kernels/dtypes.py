"""Deprecated (removed in the next release): the weight dtypes and formats registry lives in
:mod:`lorasc_kernels.formats.registry`."""

import warnings

from .formats.registry import *  # noqa: F403
from .formats.registry import __all__  # noqa: F401

warnings.warn(
    "lorasc_kernels.dtypes is deprecated: import from lorasc_kernels.formats.registry",
    DeprecationWarning,
    stacklevel=2,
)
