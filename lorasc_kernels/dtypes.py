"""The weight dtypes the package supports: one registry that the checks, the roundings, the
merges and the kernel configurations read.

Every kernel stores weights in one of :data:`KERNEL_DTYPES` and computes in float32; the
torch backend also takes float64 (the oracle of ``gradcheck``). A dtype's entry says how
float32 values round into it (:func:`lorasc_kernels.rounding.round_from_fp32`):
stochastic rounding replaces the ``23 - mantissa_bits`` low float32 mantissa bits by a
random carry, and a dtype with float32's 8 exponent bits rounds to nearest on the bits.
The C++ side keeps the same list in ``csrc/lorasc/weight_types.h``.

Adding a weight format (for example fp8 e4m3 with per-row scales) starts here: one entry,
then the C++ header, then whatever the entry's new fields ask of the backends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "WeightDtype",
    "WEIGHT_DTYPES",
    "KERNEL_DTYPES",
    "REFERENCE_DTYPES",
    "dtype_names",
    "weight_dtype",
    "float32_scalar",
]

_FLOAT32_MANTISSA_BITS = 23
_FLOAT32_EXPONENT_BITS = 8


@dataclass(frozen=True)
class WeightDtype:
    """One storage dtype of weights: its torch dtype and its float32 → dtype rounding."""

    dtype: torch.dtype
    mantissa_bits: int
    exponent_bits: int

    @property
    def dropped_bits(self) -> int:
        """Low float32 mantissa bits that rounding to this dtype removes (0: exact)."""
        return max(0, _FLOAT32_MANTISSA_BITS - self.mantissa_bits)

    @property
    def nearest_on_bits(self) -> bool:
        """Round-to-nearest-even can be done on the float32 bit pattern (same exponent range)."""
        return self.exponent_bits == _FLOAT32_EXPONENT_BITS and self.dropped_bits > 0


WEIGHT_DTYPES: dict[torch.dtype, WeightDtype] = {
    entry.dtype: entry
    for entry in (
        WeightDtype(torch.float32, mantissa_bits=23, exponent_bits=8),
        WeightDtype(torch.float16, mantissa_bits=10, exponent_bits=5),
        WeightDtype(torch.bfloat16, mantissa_bits=7, exponent_bits=8),
    )
}
KERNEL_DTYPES: tuple[torch.dtype, ...] = tuple(WEIGHT_DTYPES)
# float64 is the torch backend's only: gradcheck and float64 oracles.
REFERENCE_DTYPES: tuple[torch.dtype, ...] = KERNEL_DTYPES + (torch.float64,)


def dtype_names(dtypes) -> list[str]:
    """``["torch.float32", ...]``: dtypes as error messages name them."""
    return [str(dtype) for dtype in dtypes]


def weight_dtype(dtype: torch.dtype) -> WeightDtype:
    """The registry entry of ``dtype``; float64 rounds like float32 (nothing to drop)."""
    if dtype == torch.float64:
        return WEIGHT_DTYPES[torch.float32]
    if dtype not in WEIGHT_DTYPES:
        raise TypeError(f"weights must have a dtype in {dtype_names(REFERENCE_DTYPES)}, "
                        f"got {dtype}")
    return WEIGHT_DTYPES[dtype]


def float32_scalar(value: float) -> float:
    """``value`` rounded to the nearest float32: the scalars every kernel receives."""
    return float(torch.tensor(value, dtype=torch.float32))
