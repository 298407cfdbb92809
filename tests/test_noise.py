"""The counter-based noise of lorasc_kernels.noise: statistics, determinism, offsets."""

import pytest
import torch

from lorasc_kernels import noise as noise_lib


def test_range_mean_variance():
    u = noise_lib.noise(1234, 512, 512).double()
    assert u.dtype == torch.float64 and u.min() >= -0.5 and u.max() < 0.5
    n = u.numel()
    # Uniform(-1/2, 1/2): mean 0, variance 1/12; 5-sigma bounds for n samples.
    assert abs(u.mean().item()) < 5 * (1 / 12) ** 0.5 / n**0.5
    assert abs(u.var().item() - 1 / 12) < 5 * (1 / 180) ** 0.5 / n**0.5


def test_resolution_at_least_24_bits():
    u = noise_lib.noise(7, 256, 256)
    steps = (u.double() + 0.5) * 2**24
    assert torch.equal(steps, steps.round())
    assert torch.unique(u).numel() > 0.99 * u.numel()


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_no_correlation_between_neighbours_and_seeds():
    u = noise_lib.noise(99, 400, 400)
    bound = 5 / u[:, 1:].numel() ** 0.5
    assert abs(_correlation(u[:, 1:], u[:, :-1])) < bound
    assert abs(_correlation(u[1:, :], u[:-1, :])) < bound
    assert abs(_correlation(u, noise_lib.noise(100, 400, 400))) < bound
    other_stream = noise_lib.noise(99, 400, 400, stream=noise_lib.STREAM_ROUNDING)
    assert abs(_correlation(u, other_stream)) < bound


def test_same_seed_same_bits_and_seeds_differ():
    assert torch.equal(noise_lib.noise(5, 33, 17), noise_lib.noise(5, 33, 17))
    assert not torch.equal(noise_lib.noise(5, 33, 17), noise_lib.noise(6, 33, 17))
    # 64-bit seeds use their high half too.
    assert not torch.equal(noise_lib.noise(5, 8, 8), noise_lib.noise(5 + 2**32, 8, 8))


@pytest.mark.parametrize("offset,rows", [(0, 10), (13, 7), (60, 4)])
def test_row_offset_block_equals_rows_of_whole(offset, rows):
    whole = noise_lib.noise(42, 64, 29)
    block = noise_lib.noise(42, rows, 29, row_offset=offset)
    assert torch.equal(block, whole[offset : offset + rows])


def test_torch_hash_matches_python_int_hash():
    key = noise_lib.stream_key(3, noise_lib.STREAM_NOISE)
    bits = noise_lib.hash_bits(key, 3, 4, row_offset=2**31)
    for i in range(3):
        row_hash = noise_lib.mix32_int((2**31 + i) ^ key)
        for j in range(4):
            assert bits[i, j].item() == noise_lib.mix32_int(row_hash ^ j)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"seed": -1}, ValueError),
        ({"seed": 2**64}, ValueError),
        ({"seed": 1.5}, TypeError),
        ({"rows": -1}, ValueError),
        ({"row_offset": 2**32}, ValueError),
        ({"cols": 2.0}, TypeError),
    ],
)
def test_bad_arguments(kwargs, error):
    arguments = {"seed": 0, "rows": 2, "cols": 2, **kwargs}
    with pytest.raises(error):
        noise_lib.noise(**arguments)
