"""The fp8 e4m3 weight format: the integer rounding against torch's conversion, stochastic
rounding's expectation, per-row quantization and the rescale rule (docs/fp8.md)."""

import pytest
import torch

from lorasc_kernels import noise as noise_lib
from lorasc_kernels.dtypes import SCALED_WEIGHT_DTYPES, WEIGHT_FORMATS
from lorasc_kernels.quantize import dequantize, format_dtype, quantize
from lorasc_kernels.rounding import rescale_rows, round_to_scaled

E4M3 = torch.float8_e4m3fn


def _codes(tensor):
    return tensor.view(torch.uint8)


def _finite_values():
    """Every finite e4m3 value, sorted."""
    values = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    return values[torch.isfinite(values)].sort().values


def _hard_values():
    """Random values over e4m3's whole range, every e4m3 value, the ties between neighbours
    and their float32 neighbours, float32 subnormals and signed zeros."""
    generator = torch.Generator().manual_seed(0)
    exponents = torch.randint(-16, 9, (20000,), generator=generator).float()
    random = (torch.randn(20000, generator=generator) * torch.exp2(exponents)).clamp(-448, 448)
    values = _finite_values()
    ties = (values[1:] + values[:-1]) / 2
    big = torch.tensor(1e9)
    return torch.cat([random, values, ties, ties.nextafter(big), ties.nextafter(-big),
                      torch.tensor([0.0, -0.0, 1e-40, -1e-42, 2.0**-10, 3 * 2.0**-11])])


def test_registry_names_fp8_e4m3():
    assert WEIGHT_FORMATS == {"fp8_e4m3": E4M3}
    entry = SCALED_WEIGHT_DTYPES[E4M3]
    assert (entry.max_value, entry.min_exponent, entry.step_bits) == (448.0, -6, 20)
    assert format_dtype("fp8_e4m3") == E4M3
    with pytest.raises(ValueError, match="weight_format"):
        format_dtype("fp8_e5m2")


def test_nearest_equals_torchs_conversion_bit_for_bit():
    values = _hard_values()
    assert torch.equal(_codes(round_to_scaled(values, E4M3, "nearest")), _codes(values.to(E4M3)))


def test_stochastic_rounds_to_a_neighbour_and_keeps_exact_values():
    values = _hard_values()
    bits = noise_lib.hash_bits(noise_lib.stream_key(3, 1), 1, values.numel())[0]
    rounded = round_to_scaled(values, E4M3, "stochastic", bits).float()
    grid = _finite_values()
    below = grid[(torch.searchsorted(grid, values, right=True) - 1).clamp(0, len(grid) - 1)]
    above = grid[torch.searchsorted(grid, values).clamp(max=len(grid) - 1)]
    assert bool(((rounded == below) | (rounded == above)).all())
    exact = _finite_values()
    bits = noise_lib.hash_bits(noise_lib.stream_key(4, 1), 1, exact.numel())[0]
    assert torch.equal(round_to_scaled(exact, E4M3, "stochastic", bits).float(), exact)


@pytest.mark.parametrize("value", [0.3 * 2.0**-9, 2.0**-7 + 0.37 * 2.0**-9,  # subnormals
                                   1.0 + 0.1 / 8, -200.0 - 0.6 * 32])        # normals
def test_stochastic_rounding_is_unbiased(value):
    count = 1 << 16
    bits = noise_lib.hash_bits(noise_lib.stream_key(11, 1), 1, count)[0]
    rounded = round_to_scaled(torch.full((count,), value), E4M3, "stochastic", bits)
    mean = rounded.double().mean().item()
    step = abs(value) * 2.0**-3 if abs(value) >= 2.0**-6 else 2.0**-9
    assert abs(mean - value) < 4 * step / count**0.5  # ~4 standard errors
    assert rounded.float().unique().numel() == 2


def test_quantize_is_per_row_absmax_and_round_to_nearest():
    weight = torch.randn(37, 91) * torch.logspace(-4, 1, 37)[:, None]
    weight[5] = 0.0
    q, scale = quantize(weight)
    assert q.dtype == E4M3 and scale.dtype == torch.float32 and scale.shape == (37,)
    assert scale[5] == 1.0
    peaks = q.float().abs().amax(dim=1)
    assert bool((peaks[torch.arange(37) != 5] == 448.0).all())
    assert torch.equal(_codes(q), _codes((weight / scale[:, None]).to(E4M3)))
    error = (dequantize(q, scale, torch.float64) - weight.double()).abs()
    bound = weight.double().abs() * 2.0**-4 + scale.double()[:, None] * 2.0**-10
    assert bool((error <= bound).all())


def test_quantize_refuses_non_finite_and_non_2d():
    with pytest.raises(ValueError, match="non-finite"):
        quantize(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.ones(3))


def test_rescale_takes_the_smallest_power_of_two_that_fits():
    values = torch.tensor([[448.0, 1.0], [449.0, -3.0], [-896.0, 0.5], [897.0, 0.0],
                           [2.0**100, 1.0], [0.0, 0.0]])
    scale = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 7.0])
    rescaled, new_scale = rescale_rows(values, scale, 448.0)
    powers = torch.tensor([1.0, 2.0, 2.0, 4.0, 2.0**92, 1.0])
    assert torch.equal(new_scale, scale * powers)
    assert torch.equal(rescaled, values / powers[:, None])
    assert bool((rescaled.abs().amax(dim=1) <= 448.0).all())
    assert bool((rescaled.abs().amax(dim=1)[:5] > 224.0).all())  # the smallest power
