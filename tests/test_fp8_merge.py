"""Merges into scaled weights (each fp8 format of the registry, per-row scales): every backend
that declares the format reproduces the reference bit for bit (codes and scales), on odd
shapes, shards and strides; rows that would leave the format's range are rescaled, never
clamped (docs/fp8.md)."""

import pytest
import torch
from helpers import scaled_backend, scaled_step

from lorasc_kernels import ScaledWeight, merge_lowrank_
from lorasc_kernels.backends import backend_module
from lorasc_kernels.formats.quantize import quantize
from lorasc_kernels.formats.registry import scaled_weight_dtype
from tests.backend_params import DEVICE


def _scaled_inputs(dtype, rows, cols, r, update=1.0, seed=0):
    """``(ScaledWeight, lora_B, lora_A)`` with the update's size relative to the weight's."""
    generator = torch.Generator().manual_seed(seed)
    weight = quantize(torch.randn(rows, cols, generator=generator) / cols**0.5, dtype)
    lora_B = torch.randn(rows, r, generator=generator) * update / r**0.5
    lora_A = torch.randn(r, cols, generator=generator) / cols**0.5
    return (
        ScaledWeight(weight.codes.to(DEVICE), weight.scale.to(DEVICE)),
        lora_B.to(DEVICE),
        lora_A.to(DEVICE),
    )


def _copy(weight: ScaledWeight) -> ScaledWeight:
    return ScaledWeight(weight.codes.clone(), weight.scale.clone())


def _merged(backend, weight, lora_B, lora_A, **kwargs) -> ScaledWeight:
    return merge_lowrank_(_copy(weight), lora_B, lora_A, backend=backend, **kwargs)


def _assert_same(got: ScaledWeight, expected: ScaledWeight):
    assert torch.equal(got.codes.view(torch.uint8), expected.codes.view(torch.uint8))
    assert torch.equal(got.scale, expected.scale)


@pytest.mark.parametrize("shape", [(37, 91, 5), (1, 7, 1), (64, 33, 16)])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("update", [0.05, 30.0])  # small, and large enough to rescale rows
def test_matches_reference_bit_for_bit(backend, scaled_dtype, shape, rounding, noise, update):
    backend = scaled_backend(backend, scaled_dtype)
    rows, cols, r = shape
    inputs = _scaled_inputs(scaled_dtype, rows, cols, r, update)
    kwargs = {"coeff": 0.7, "rounding": rounding, "seed": 2**63 + 5, "row_offset": 3}
    if noise:
        kwargs.update(noise_remove=(11, 0.002), noise_add=(12, 0.003))
    got = _merged(backend, *inputs, **kwargs)
    _assert_same(got, _merged("torch", *inputs, **kwargs))
    if update > 1.0:
        assert bool((got.scale > inputs[0].scale).any())  # some rows were rescaled


def test_shards_equal_whole(backend, scaled_dtype):
    backend = scaled_backend(backend, scaled_dtype)
    weight, lora_B, lora_A = _scaled_inputs(scaled_dtype, 29, 45, 4, update=10.0, seed=1)
    whole = _merged(backend, weight, lora_B, lora_A, coeff=0.5, seed=9)
    shards = _copy(weight)
    for start, stop in ((0, 10), (10, 11), (11, 29)):
        shard = ScaledWeight(shards.codes[start:stop], shards.scale[start:stop])
        merge_lowrank_(
            shard, lora_B[start:stop], lora_A, 0.5, seed=9, row_offset=start, backend=backend
        )
    _assert_same(shards, whole)


def test_strided_codes_and_scale(backend, scaled_dtype):
    backend = scaled_backend(backend, scaled_dtype)
    weight, lora_B, lora_A = _scaled_inputs(scaled_dtype, 31, 40, 3, update=5.0, seed=2)
    codes = weight.codes.t().contiguous().t()  # column-major codes
    scale = torch.stack([weight.scale, weight.scale], dim=1)[:, 0].clone()
    got = merge_lowrank_(ScaledWeight(codes, scale), lora_B, lora_A, 0.8, backend=backend)
    _assert_same(got, _merged("torch", weight, lora_B, lora_A, coeff=0.8))


def test_result_matches_float64_within_one_step(backend, scaled_dtype):
    backend = scaled_backend(backend, scaled_dtype)
    weight, lora_B, lora_A = _scaled_inputs(scaled_dtype, 23, 57, 6, update=20.0, seed=3)
    expected = weight.dequantize(torch.float64) + 0.9 * lora_B.double() @ lora_A.double()
    got = _merged(backend, weight, lora_B, lora_A, coeff=0.9)
    max_value = scaled_weight_dtype(scaled_dtype).max_value
    assert bool((got.codes.float().abs().amax(dim=1) <= max_value).all())
    error = (got.dequantize(torch.float64) - expected).abs()
    step = scaled_step(scaled_dtype, expected, got.scale)
    assert bool((error <= step * (1 + 1e-6)).all())  # one step at most, nothing clamped


def test_stochastic_keeps_sub_step_updates_nearest_loses_them(backend, scaled_dtype):
    backend = scaled_backend(backend, scaled_dtype)
    entry = scaled_weight_dtype(scaled_dtype)
    weight, lora_B, lora_A = _scaled_inputs(scaled_dtype, 16, 64, 2, seed=4)
    update = lora_B.double() @ lora_A.double()
    exponent = torch.floor(
        torch.log2(weight.codes.double().abs().clamp_min(2.0**entry.min_exponent))
    )
    step = weight.scale.double()[:, None] * torch.exp2(exponent - entry.mantissa_bits)
    coeff = 0.2 / float((update.abs() / step).max())  # under 0.2 of a step everywhere
    merges = 40
    results = {}
    for rounding in ("nearest", "stochastic"):
        merged = _copy(weight)
        for index in range(merges):
            merge_lowrank_(
                merged, lora_B, lora_A, coeff, rounding=rounding, seed=index, backend=backend
            )
        results[rounding] = merged.dequantize(torch.float64)
    target = merges * coeff * update
    start = weight.dequantize(torch.float64)
    kept = {
        name: float(((value - start) * target).sum() / (target * target).sum())
        for name, value in results.items()
    }
    assert kept["nearest"] == 0.0  # every update below half a step: all lost
    assert 0.8 < kept["stochastic"] < 1.2


@pytest.mark.parametrize(
    "scale, error, match",
    [
        (torch.ones(5, dtype=torch.float64), TypeError, "ScaledWeight scale must be a float32"),
        (torch.ones(4), ValueError, r"ScaledWeight scale must have shape \(5,\)"),
        (torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0]), ValueError, "weight.scale must be positive"),
        (torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0]), ValueError, "positive and finite"),
    ],
)
def test_bad_scales_raise_and_leave_weight(scaled_dtype, scale, error, match):
    weight, lora_B, lora_A = _scaled_inputs(scaled_dtype, 5, 8, 2)
    before = weight.codes.clone()
    with pytest.raises(error, match=match):
        merge_lowrank_(
            ScaledWeight(weight.codes, scale.to(DEVICE)), lora_B, lora_A, 1.0, backend="torch"
        )
    assert torch.equal(weight.codes.view(torch.uint8), before.view(torch.uint8))


def test_codes_without_their_scales_are_refused(scaled_dtype):
    weight, lora_B, lora_A = _scaled_inputs(scaled_dtype, 5, 8, 2)
    with pytest.raises(
        TypeError,
        match=r"pass it with its per-row float32 scales as "
        r"ScaledWeight\(codes, scale\)",
    ):
        merge_lowrank_(weight.codes, lora_B, lora_A, 1.0, backend="torch")
    with pytest.raises(TypeError, match="ScaledWeight codes must be a tensor with a scaled"):
        ScaledWeight(torch.zeros(5, 8, device=DEVICE), weight.scale)


def test_float32_overflow_is_refused(scaled_dtype):
    weight, lora_B, lora_A = _scaled_inputs(scaled_dtype, 5, 8, 2)
    before = _copy(weight)
    with pytest.raises(ValueError, match="overflow float32"):
        merge_lowrank_(weight, lora_B * 1e3, lora_A, 3e38, backend="torch")
    _assert_same(weight, before)


def test_a_backend_without_the_format_refuses_it_by_name(backend, scaled_dtype):
    if scaled_dtype in backend_module(backend).SCALED_WEIGHT_DTYPES:
        pytest.skip(f"backend {backend!r} takes {scaled_dtype} weights")
    weight, lora_B, lora_A = _scaled_inputs(scaled_dtype, 5, 8, 2)
    before = weight.codes.clone()
    with pytest.raises(TypeError, match=f"backend {backend!r} does not take"):
        merge_lowrank_(weight, lora_B, lora_A, 1.0, backend=backend)
    assert torch.equal(weight.codes.view(torch.uint8), before.view(torch.uint8))
