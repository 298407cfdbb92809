"""Merges into fp8 e4m3 weights with per-row scales: every backend that declares the format
reproduces the reference bit for bit (codes and scales), on odd shapes, shards and strides;
rows that would leave the format's range are rescaled, never clamped (docs/fp8.md)."""

import pytest
import torch
from backends import DEVICE

from lorasc_kernels import merge_lowrank_
from lorasc_kernels.backends import backend_module
from lorasc_kernels.quantize import dequantize, quantize

E4M3 = torch.float8_e4m3fn


def _scaled_inputs(rows, cols, r, update=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, scale = quantize(torch.randn(rows, cols, generator=generator) / cols**0.5)
    lora_B = torch.randn(rows, r, generator=generator) * update / r**0.5
    lora_A = torch.randn(r, cols, generator=generator) / cols**0.5
    return q.to(DEVICE), scale.to(DEVICE), lora_B.to(DEVICE), lora_A.to(DEVICE)


def _fp8_backend(backend):
    if E4M3 not in backend_module(backend).SCALED_WEIGHT_DTYPES:
        pytest.skip(f"backend {backend!r} declares no fp8 weights")
    return backend


def _merged(backend, q, scale, lora_B, lora_A, **kwargs):
    q, scale = q.clone(), scale.clone()
    merge_lowrank_(q, lora_B, lora_A, backend=backend, weight_scale=scale, **kwargs)
    return q, scale


def _assert_same(got, expected):
    assert torch.equal(got[0].view(torch.uint8), expected[0].view(torch.uint8))
    assert torch.equal(got[1], expected[1])


@pytest.mark.parametrize("shape", [(37, 91, 5), (1, 7, 1), (64, 33, 16)])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("update", [0.05, 30.0])  # small, and large enough to rescale rows
def test_matches_reference_bit_for_bit(backend, shape, rounding, noise, update):
    backend = _fp8_backend(backend)
    rows, cols, r = shape
    inputs = _scaled_inputs(rows, cols, r, update)
    kwargs = {"coeff": 0.7, "rounding": rounding, "seed": 2**63 + 5, "row_offset": 3}
    if noise:
        kwargs.update(noise_remove=(11, 0.002), noise_add=(12, 0.003))
    got = _merged(backend, *inputs, **kwargs)
    expected = _merged("torch", *inputs, **kwargs)
    _assert_same(got, expected)
    if update > 1.0:
        assert bool((got[1] > inputs[1]).any())  # some rows were rescaled


def test_shards_equal_whole(backend):
    backend = _fp8_backend(backend)
    q, scale, lora_B, lora_A = _scaled_inputs(29, 45, 4, update=10.0, seed=1)
    whole = _merged(backend, q, scale, lora_B, lora_A, coeff=0.5, seed=9)
    shards = q.clone(), scale.clone()
    for start, stop in ((0, 10), (10, 11), (11, 29)):
        merge_lowrank_(shards[0][start:stop], lora_B[start:stop], lora_A, 0.5, seed=9,
                       row_offset=start, backend=backend, weight_scale=shards[1][start:stop])
    _assert_same(shards, whole)


def test_strided_weight_and_scale(backend):
    backend = _fp8_backend(backend)
    q, scale, lora_B, lora_A = _scaled_inputs(31, 40, 3, update=5.0, seed=2)
    q_t = q.t().contiguous().t()  # column-major codes
    scale_strided = torch.stack([scale, scale], dim=1)[:, 0]
    got_q, got_scale = q_t.clone(), scale_strided.clone()
    merge_lowrank_(got_q, lora_B, lora_A, 0.8, backend=backend, weight_scale=got_scale)
    _assert_same((got_q, got_scale), _merged("torch", q, scale, lora_B, lora_A, coeff=0.8))


def test_result_matches_float64_within_one_step(backend):
    backend = _fp8_backend(backend)
    q, scale, lora_B, lora_A = _scaled_inputs(23, 57, 6, update=20.0, seed=3)
    expected = dequantize(q, scale, torch.float64) + 0.9 * lora_B.double() @ lora_A.double()
    got_q, got_scale = _merged(backend, q, scale, lora_B, lora_A, coeff=0.9)
    assert bool((got_q.float().abs().amax(dim=1) <= 448.0).all())
    error = (dequantize(got_q, got_scale, torch.float64) - expected).abs()
    step = torch.maximum(expected.abs() * 2.0**-3, got_scale.double()[:, None] * 2.0**-9)
    assert bool((error <= step * (1 + 1e-6)).all())  # one e4m3 step at most, nothing clamped


def test_stochastic_keeps_sub_step_updates_nearest_loses_them(backend):
    backend = _fp8_backend(backend)
    q, scale, lora_B, lora_A = _scaled_inputs(16, 64, 2, seed=4)
    update = (lora_B.double() @ lora_A.double())
    exponent = torch.floor(torch.log2(q.double().abs().clamp_min(2.0**-6)))
    step = scale.double()[:, None] * torch.exp2(exponent - 3)  # e4m3's step at each weight
    coeff = 0.2 / float((update.abs() / step).max())  # under 0.2 of a step everywhere
    merges = 40
    results = {}
    for rounding in ("nearest", "stochastic"):
        weight, weight_scale = q.clone(), scale.clone()
        for index in range(merges):
            merge_lowrank_(weight, lora_B, lora_A, coeff, rounding=rounding, seed=index,
                           backend=backend, weight_scale=weight_scale)
        results[rounding] = dequantize(weight, weight_scale, torch.float64)
    target = merges * coeff * update
    start = dequantize(q, scale, torch.float64)
    kept = {name: float(((value - start) * target).sum() / (target * target).sum())
            for name, value in results.items()}
    assert kept["nearest"] == 0.0  # every update below half a step: all lost
    assert 0.8 < kept["stochastic"] < 1.2


@pytest.mark.parametrize("weight_scale, error, match", [
    (None, TypeError, "weight_scale"),
    (torch.ones(5, dtype=torch.float64), TypeError, "float32"),
    (torch.ones(4), ValueError, "weight_scale must have shape"),
    (torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0]), ValueError, "positive and finite"),
    (torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0]), ValueError, "positive and finite"),
])
def test_bad_scales_raise_and_leave_weight(weight_scale, error, match):
    q, scale, lora_B, lora_A = _scaled_inputs(5, 8, 2)
    before = q.clone()
    with pytest.raises(error, match=match):
        merge_lowrank_(q, lora_B, lora_A, 1.0, backend="torch",
                       weight_scale=None if weight_scale is None else weight_scale.to(DEVICE))
    assert torch.equal(q.view(torch.uint8), before.view(torch.uint8))


def test_float32_overflow_is_refused_and_a_float_weight_refuses_a_scale():
    q, scale, lora_B, lora_A = _scaled_inputs(5, 8, 2)
    before = q.clone(), scale.clone()
    with pytest.raises(ValueError, match="overflow float32"):
        merge_lowrank_(q, lora_B * 1e3, lora_A, 3e38, backend="torch", weight_scale=scale)
    _assert_same((q, scale), before)
    with pytest.raises(TypeError, match="weight_scale is given"):
        merge_lowrank_(torch.zeros(5, 8, device=DEVICE), lora_B, lora_A, 1.0, backend="torch",
                       weight_scale=scale)


def test_a_backend_without_fp8_refuses_it_by_name(backend):
    if E4M3 in backend_module(backend).SCALED_WEIGHT_DTYPES:
        pytest.skip(f"backend {backend!r} takes fp8 weights")
    q, scale, lora_B, lora_A = _scaled_inputs(5, 8, 2)
    before = q.clone()
    with pytest.raises(TypeError, match=f"backend {backend!r} does not take"):
        merge_lowrank_(q, lora_B, lora_A, 1.0, backend=backend, weight_scale=scale)
    assert torch.equal(q.view(torch.uint8), before.view(torch.uint8))
