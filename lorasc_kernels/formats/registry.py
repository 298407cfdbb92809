"""The weight dtypes the package supports: one registry that the checks, the roundings, the
merges and the kernel configurations read.

Every kernel stores weights in one of :data:`KERNEL_DTYPES` and computes in float32; the
torch backend also takes float64 (the oracle of ``gradcheck``). A dtype's entry says how
float32 values round into it (:func:`lorasc_kernels.formats.rounding.round_from_fp32`):
stochastic rounding replaces the ``23 - mantissa_bits`` low float32 mantissa bits by a
random carry, and a dtype with float32's 8 exponent bits rounds to nearest on the bits.
The C++ side keeps the same list in ``csrc/lorasc/weight_types.h``.

Scaled formats (:data:`SCALED_WEIGHT_DTYPES`) store weights as 8-bit codes ``q`` with one
float32 scale per output row, ``W = scale[row] · q`` (a
:class:`~lorasc_kernels.formats.scaled_weight.ScaledWeight`): fp8 e4m3 (``torch.float8_e4m3fn``)
and fp8 e5m2 (``torch.float8_e5m2``). Inputs, LoRA factors and outputs stay in a kernel
dtype; the format's rounding is :func:`lorasc_kernels.formats.rounding.round_to_scaled`, the Triton
kernels get its fields as constexprs, and its rules are in ``docs/fp8.md``.

Adding a weight format starts here: one entry, then the C++ header, then whatever the
entry's new fields ask of the backends (``docs/contributing.md``).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

__all__ = [
    "WeightDtype",
    "WEIGHT_DTYPES",
    "ScaledWeightDtype",
    "SCALED_WEIGHT_DTYPES",
    "WEIGHT_FORMATS",
    "SCALED_DTYPES",
    "ACTIVATION_FORMAT",
    "scaled_weight_dtype",
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


@dataclass(frozen=True)
class ScaledWeightDtype(WeightDtype):
    """A narrow float format stored with one float32 scale per row: ``W = scale[row] · q``.

    Codes are 8 bits: sign, ``exponent_bits`` biased by ``exponent_bias`` and
    ``mantissa_bits``, with subnormals below ``2**min_exponent``; ``max_value`` is the largest
    finite value. ``has_infinity``: the all-ones exponent field holds ±inf (fraction 0) and
    NaN (IEEE-style, e5m2); else (the "fn" formats, e4m3fn) there is no infinity and only the
    all-ones magnitude is NaN. ``name`` is what the user-facing ``weight_format`` options
    call it.
    ``min_scale`` is the smallest row scale: every code times it is a float32 normal, and
    dividing by it (the merge's ``v / scale``, the fused GEMM's rank term) stays finite for
    values below ``2**64``.
    """

    name: str = ""
    exponent_bias: int = 0
    max_value: float = 0.0
    has_infinity: bool = False
    min_scale: float = 2.0**-64

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal value (``1 - exponent_bias``)."""
        return 1 - self.exponent_bias

    @property
    def step_bits(self) -> int:
        """Bits of a float32 mantissa below the format's last bit: the random bits of a step
        (20 for e4m3, 21 for e5m2)."""
        return _FLOAT32_MANTISSA_BITS - self.mantissa_bits


SCALED_WEIGHT_DTYPES: dict[torch.dtype, ScaledWeightDtype] = {
    entry.dtype: entry
    for entry in (
        ScaledWeightDtype(
            torch.float8_e4m3fn,
            mantissa_bits=3,
            exponent_bits=4,
            name="fp8_e4m3",
            exponent_bias=7,
            max_value=448.0,
        ),
        ScaledWeightDtype(
            torch.float8_e5m2,
            mantissa_bits=2,
            exponent_bits=5,
            name="fp8_e5m2",
            exponent_bias=15,
            max_value=57344.0,
            has_infinity=True,
        ),
    )
}
# weight_format names of the user-facing options → their dtype.
WEIGHT_FORMATS: dict[str, torch.dtype] = {
    entry.name: dtype for dtype, entry in SCALED_WEIGHT_DTYPES.items()
}
# The format activations and gradients are quantized to (fp8 serving, the fp8 compute mode),
# whatever the weight's: e4m3 keeps the most precision, and cuBLAS's fp8 GEMM takes it with
# every weight format (two e5m2 operands it refuses).
ACTIVATION_FORMAT = "fp8_e4m3"
KERNEL_DTYPES: tuple[torch.dtype, ...] = tuple(WEIGHT_DTYPES)
SCALED_DTYPES: tuple[torch.dtype, ...] = tuple(SCALED_WEIGHT_DTYPES)
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
        raise TypeError(
            f"weights must have a dtype in {dtype_names(REFERENCE_DTYPES)}, got {dtype}"
        )
    return WEIGHT_DTYPES[dtype]


def scaled_weight_dtype(dtype: torch.dtype) -> ScaledWeightDtype:
    """The registry entry of the scaled format ``dtype``."""
    if dtype not in SCALED_WEIGHT_DTYPES:
        raise TypeError(
            f"scaled weights must have a dtype in {dtype_names(SCALED_WEIGHT_DTYPES)}, got {dtype}"
        )
    return SCALED_WEIGHT_DTYPES[dtype]


def float32_scalar(value: float) -> float:
    """``value`` rounded to the nearest float32 (ties to even; ±inf past its range), as
    ``torch.tensor(value, dtype=torch.float32)`` rounds it: the scalars every kernel
    receives. Pure Python (a C ``float`` cast): no tensor, no aten op, no device read."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # rounds past float32's largest value
        return math.copysign(math.inf, value)
