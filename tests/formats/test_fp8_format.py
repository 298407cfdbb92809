"""The scaled weight formats of the registry (fp8 e4m3 and e5m2), each: the registry entry
against torch's own dtype, the integer rounding against torch's conversion, stochastic
rounding's expectation, the kernels' integer decode, per-row quantization and the rescale
rule (docs/fp8.md)."""

import math

import pytest
import torch
import triton
import triton.language as tl

from lorasc_kernels import ScaledWeight
from lorasc_kernels import noise as noise_lib
from lorasc_kernels.backends.triton.device import decode_scaled
from lorasc_kernels.backends.triton.fused_linear_scaled import format_fields
from lorasc_kernels.formats.quantize import format_dtype, quantize
from lorasc_kernels.formats.registry import (
    SCALED_WEIGHT_DTYPES,
    WEIGHT_FORMATS,
    scaled_weight_dtype,
)
from lorasc_kernels.formats.rounding import rescale_rows, round_to_scaled
from tests.helpers import scaled_step


def _codes(tensor):
    return tensor.view(torch.uint8)


def _every_value(dtype):
    """The float32 value of each of the format's 256 codes, in code order."""
    return torch.arange(256, dtype=torch.uint8).view(dtype).float()


def _finite_values(dtype):
    """Every finite value of the format, sorted."""
    values = _every_value(dtype)
    return values[torch.isfinite(values)].sort().values


def _hard_values(dtype):
    """Random values over the format's whole range, every value, the ties between neighbours
    and their float32 neighbours, float32 subnormals and signed zeros."""
    entry = scaled_weight_dtype(dtype)
    generator = torch.Generator().manual_seed(0)
    low = entry.min_exponent - entry.mantissa_bits - 4
    high = math.floor(math.log2(entry.max_value)) + 1
    exponents = torch.randint(low, high, (20000,), generator=generator).float()
    random = (torch.randn(20000, generator=generator) * torch.exp2(exponents)).clamp(
        -entry.max_value, entry.max_value
    )
    values = _finite_values(dtype)
    ties = (values[1:] + values[:-1]) / 2
    big = torch.tensor(1e9)
    return torch.cat(
        [
            random,
            values,
            ties,
            ties.nextafter(big),
            ties.nextafter(-big),
            torch.tensor([0.0, -0.0, 1e-40, -1e-42]),
        ]
    )


def test_registry_names_the_formats():
    assert WEIGHT_FORMATS == {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
    fields = {
        entry.name: (entry.max_value, entry.min_exponent, entry.step_bits, entry.has_infinity)
        for entry in SCALED_WEIGHT_DTYPES.values()
    }
    assert fields == {"fp8_e4m3": (448.0, -6, 20, False), "fp8_e5m2": (57344.0, -14, 21, True)}
    assert format_dtype("fp8_e5m2") == torch.float8_e5m2
    with pytest.raises(ValueError, match="weight_format"):
        format_dtype("fp8_e3m4")


def test_the_entry_agrees_with_torchs_dtype(scaled_dtype):
    entry = scaled_weight_dtype(scaled_dtype)
    info = torch.finfo(scaled_dtype)
    assert info.bits == 1 + entry.exponent_bits + entry.mantissa_bits == 8
    assert (info.max, info.smallest_normal, info.eps) == (
        entry.max_value,
        2.0**entry.min_exponent,
        2.0**-entry.mantissa_bits,
    )
    assert entry.min_exponent == 1 - entry.exponent_bias
    infinity = torch.tensor([float("inf")]).to(scaled_dtype).float()
    assert bool(torch.isinf(infinity).all()) == entry.has_infinity


def test_nearest_equals_torchs_conversion_bit_for_bit(scaled_dtype):
    values = _hard_values(scaled_dtype)
    assert torch.equal(
        _codes(round_to_scaled(values, scaled_dtype, "nearest")), _codes(values.to(scaled_dtype))
    )


def test_stochastic_rounds_to_a_neighbour_and_keeps_exact_values(scaled_dtype):
    values = _hard_values(scaled_dtype)
    bits = noise_lib.hash_bits(noise_lib.stream_key(3, 1), 1, values.numel())[0]
    rounded = round_to_scaled(values, scaled_dtype, "stochastic", bits).float()
    grid = _finite_values(scaled_dtype)
    below = grid[(torch.searchsorted(grid, values, right=True) - 1).clamp(0, len(grid) - 1)]
    above = grid[torch.searchsorted(grid, values).clamp(max=len(grid) - 1)]
    assert bool(((rounded == below) | (rounded == above)).all())
    exact = _finite_values(scaled_dtype)
    bits = noise_lib.hash_bits(noise_lib.stream_key(4, 1), 1, exact.numel())[0]
    assert torch.equal(round_to_scaled(exact, scaled_dtype, "stochastic", bits).float(), exact)


@pytest.mark.parametrize("where", ["subnormal", "subnormals_top", "one", "large"])
def test_stochastic_rounding_is_unbiased(scaled_dtype, where):
    entry = scaled_weight_dtype(scaled_dtype)
    unit = 2.0 ** (entry.min_exponent - entry.mantissa_bits)  # the subnormal step
    value = {
        "subnormal": 0.3 * unit,
        "subnormals_top": 2.0 ** (entry.min_exponent - 1) + 0.37 * unit,
        "one": 1.0 + 0.1 * 2.0**-entry.mantissa_bits,
        "large": -0.45 * entry.max_value,
    }[where]
    count = 1 << 16
    bits = noise_lib.hash_bits(noise_lib.stream_key(11, 1), 1, count)[0]
    rounded = round_to_scaled(torch.full((count,), value), scaled_dtype, "stochastic", bits)
    mean = rounded.double().mean().item()
    step = float(scaled_step(scaled_dtype, torch.tensor([[value]]), torch.ones(1)))
    assert abs(mean - value) < 4 * step / count**0.5  # ~4 standard errors
    assert rounded.float().unique().numel() == 2


@triton.jit
def _decode_kernel(
    code_ptr,
    out_ptr,
    MANTISSA_BITS: tl.constexpr,
    EXPONENT_BIAS: tl.constexpr,
    HAS_INFINITY: tl.constexpr,
):
    offsets = tl.arange(0, 256)
    code = tl.load(code_ptr + offsets)
    tl.store(out_ptr + offsets, decode_scaled(code, MANTISSA_BITS, EXPONENT_BIAS, HAS_INFINITY))


def test_the_kernels_integer_decode_is_torchs_conversion(scaled_dtype):
    """Every code, zeros, subnormals, ±inf and NaN included, from the entry's fields alone."""
    codes = torch.arange(256, dtype=torch.uint8)
    got = torch.empty(256)
    fields = format_fields(ScaledWeight(codes.view(scaled_dtype)[None, :], torch.ones(1)))
    _decode_kernel[(1,)](codes, got, **fields)
    expected = _every_value(scaled_dtype)
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int32), expected[~nan].view(torch.int32))


def test_quantize_is_per_row_absmax_and_round_to_nearest(scaled_dtype):
    max_value = scaled_weight_dtype(scaled_dtype).max_value
    weight = torch.randn(37, 91) * torch.logspace(-4, 1, 37)[:, None]
    weight[5] = 0.0
    scaled = quantize(weight, scaled_dtype)
    q, scale = scaled.codes, scaled.scale
    assert q.dtype == scaled.dtype == scaled_dtype and scaled.shape == (37, 91)
    assert scale.dtype == torch.float32 and scale.shape == (37,)
    assert scale[5] == 1.0
    peaks = q.float().abs().amax(dim=1)
    assert bool((peaks[torch.arange(37) != 5] == max_value).all())
    assert torch.equal(_codes(q), _codes((weight / scale[:, None]).to(scaled_dtype)))
    error = (scaled.dequantize(torch.float64) - weight.double()).abs()
    assert bool((error <= scaled_step(scaled_dtype, weight.double(), scale) / 2).all())


def test_quantize_refuses_non_finite_and_non_2d(scaled_dtype):
    with pytest.raises(ValueError, match="non-finite"):
        quantize(torch.tensor([[1.0, float("inf")]]), scaled_dtype)
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.ones(3), scaled_dtype)


def test_rescale_takes_the_smallest_power_of_two_that_fits(scaled_dtype):
    top = scaled_weight_dtype(scaled_dtype).max_value
    values = torch.tensor(
        [
            [top, 1.0],
            [top * 1.002, -3.0],
            [-2 * top, 0.5],
            [2 * top * 1.001, 0.0],
            [2.0**100, 1.0],
            [0.0, 0.0],
        ]
    )
    scale = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 7.0])
    rescaled, new_scale = rescale_rows(values, scale, top)
    powers = torch.tensor([1.0, 2.0, 2.0, 4.0, 2.0 ** (100 - math.floor(math.log2(top))), 1.0])
    assert torch.equal(new_scale, scale * powers)
    assert torch.equal(rescaled, values / powers[:, None])
    assert bool((rescaled.abs().amax(dim=1) <= top).all())
    assert bool((rescaled.abs().amax(dim=1)[:5] > top / 2).all())  # the smallest power
