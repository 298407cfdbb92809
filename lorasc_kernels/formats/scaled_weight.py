"""``ScaledWeight``: a weight in a scaled format, its codes and per-row scales as one object.

``W = scale[row] · codes`` with ``codes`` (N, K) in a format of
:data:`lorasc_kernels.formats.registry.SCALED_WEIGHT_DTYPES` and ``scale`` (N,) float32. The
functional API, :mod:`lorasc_kernels.backends.composition` and the backends take it as ``weight``
wherever they take a float weight; the ``torch.library`` ops of :mod:`lorasc_kernels.ops`
take tensors, so they unpack it into their schema and re-pack it inside. Construction checks
what costs no device sync (types, shapes, device); the scale *values* (finite, at least the
format's ``min_scale``) are checked where they are used. Merges update ``codes`` and
``scale`` in place; the container itself never changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import checks
from .registry import ScaledWeightDtype, scaled_weight_dtype

__all__ = ["ScaledWeight"]


@dataclass(frozen=True, eq=False)  # eq=False: tensors do not compare with ==
class ScaledWeight:
    """``codes`` (N, K) in a scaled format and ``scale`` (N,) float32, on one device."""

    codes: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self):
        checks.check_scaled_pair(self.codes, self.scale)

    @property
    def format(self) -> ScaledWeightDtype:
        """The format's registry entry (bits, bias, largest value, smallest scale, name)."""
        return scaled_weight_dtype(self.codes.dtype)

    @property
    def shape(self) -> torch.Size:
        """``(N, K)``, the shape of ``W``."""
        return self.codes.shape

    @property
    def dtype(self) -> torch.dtype:
        """The format's storage dtype (that of ``codes``)."""
        return self.codes.dtype

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """``W = scale[row] · codes`` (N, K), computed in float32, returned in ``dtype`` (a
        floating dtype: an integer one would truncate the values)."""
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        return (self.codes.to(torch.float32) * self.scale[:, None]).to(dtype)
