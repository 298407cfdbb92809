"""The torch reference backend of lorasc_linear against float64 math."""

import pytest
import torch

from lorasc_kernels import lorasc_linear, noise
from lorasc_kernels.backends import reference
from tests.helpers import DTYPES, TOLERANCE, lowrank_inputs, reference_float64, rel_error

M, K, N, R = 37, 91, 53, 5
SCALE = 1.7


def _with_grads(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def _float64_grads(x, weight, bias, lora_A, lora_B, dy, keep=None, p=0.0, noise_tensor=None):
    x64, w64, b64, a64, bb64 = _with_grads(
        *[None if t is None else t.double() for t in (x, weight, bias, lora_A, lora_B)]
    )
    y = reference_float64(x64, w64, b64, a64, bb64, SCALE, keep, p, noise_tensor)
    y.backward(dy.double())
    return y, x64.grad, w64.grad, None if b64 is None else b64.grad, a64.grad, bb64.grad


def test_gradcheck_float64():
    tensors = _with_grads(*lowrank_inputs(7, 6, 5, 3, torch.float64))
    assert torch.autograd.gradcheck(
        lambda x, w, b, a, bb: lorasc_linear(x, w, b, a, bb, SCALE, backend="torch"),
        tensors,
    )


def test_gradcheck_float64_with_dropout_and_noise():
    tensors = _with_grads(*lowrank_inputs(7, 6, 5, 3, torch.float64))
    assert torch.autograd.gradcheck(
        lambda x, w, b, a, bb: lorasc_linear(
            x,
            w,
            b,
            a,
            bb,
            SCALE,
            dropout_p=0.3,
            dropout_seed=11,
            noise_seed=4,
            noise_scale=0.05,
            backend="torch",
        ),
        tensors,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_grads_against_float64(dtype, bias):
    x, weight, b, lora_A, lora_B = lowrank_inputs(M, K, N, R, dtype, bias=bias)
    weight.requires_grad_(True)
    xg, wg, bg, ag, bbg = _with_grads(x, weight, b, lora_A, lora_B)
    y = lorasc_linear(xg, wg, bg, ag, bbg, SCALE, backend="torch")
    dy = torch.randn(M, N).to(dtype)
    y.backward(dy)
    expected = _float64_grads(x, weight, b, lora_A, lora_B, dy)
    tolerance = TOLERANCE[dtype]
    assert y.dtype == dtype
    for name, actual, reference_value in zip(
        ("y", "dx", "dW", "dbias", "dA", "dB"),
        (y, xg.grad, wg.grad, None if bg is None else bg.grad, ag.grad, bbg.grad),
        expected,
        strict=True,
    ):
        if reference_value is None:
            assert actual is None
            continue
        assert rel_error(actual, reference_value) < tolerance, name


def test_frozen_weight_and_bias_get_no_grad():
    x, weight, b, lora_A, lora_B = lowrank_inputs(M, K, N, R, torch.float32)
    xg, ag, bbg = _with_grads(x, lora_A, lora_B)
    lorasc_linear(xg, weight, b, ag, bbg, SCALE, backend="torch").sum().backward()
    assert weight.grad is None and b.grad is None
    assert ag.grad is not None and bbg.grad is not None and xg.grad is not None


def test_three_dim_and_non_contiguous_x():
    x, weight, b, lora_A, lora_B = lowrank_inputs(2 * 3 * 5, 2 * K, N, R, torch.float32)
    weight = weight[:, ::2]
    lora_A = lora_A[:, ::2].contiguous()
    x3 = x.reshape(2, 3, 5, 2 * K)[..., ::2]
    assert not x3.is_contiguous()
    y = lorasc_linear(x3, weight, b, lora_A, lora_B, SCALE, backend="torch")
    assert y.shape == (2, 3, 5, N)
    expected = reference_float64(x3.reshape(-1, K), weight, b, lora_A, lora_B, SCALE)
    assert rel_error(y.reshape(-1, N), expected) < TOLERANCE[torch.float32]


def test_fp32_lora_over_bf16_weight():
    x, weight, b, lora_A, lora_B = lowrank_inputs(
        M, K, N, R, torch.bfloat16, lora_dtype=torch.float32
    )
    ag, bbg = _with_grads(lora_A, lora_B)
    y = lorasc_linear(x, weight, b, ag, bbg, SCALE, backend="torch")
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    assert ag.grad.dtype == torch.float32 and bbg.grad.dtype == torch.float32
    assert rel_error(y, reference_float64(x, weight, b, lora_A, lora_B, SCALE)) < 2e-2


def test_dropout_same_seed_same_output_and_backward_uses_same_mask():
    p = 0.4
    x, weight, b, lora_A, lora_B = lowrank_inputs(M, K, N, R, torch.float32)
    seed = 2024
    outputs = []
    for _ in range(2):
        xg, ag, bbg = _with_grads(x, lora_A, lora_B)
        y = lorasc_linear(
            xg, weight, b, ag, bbg, SCALE, dropout_p=p, dropout_seed=seed, backend="torch"
        )
        dy = torch.ones_like(y)
        y.backward(dy)
        outputs.append((y, xg.grad, ag.grad, bbg.grad))
    for first, second in zip(*outputs, strict=True):
        assert torch.equal(first, second)
    keep = reference.dropout_keep_mask(seed, M, K, p)
    assert 0.5 < keep.float().mean() < 0.7  # about 1 - p kept
    expected = _float64_grads(x, weight, b, lora_A, lora_B, torch.ones(M, N), keep, p)
    for actual, reference_value in zip(outputs[0], expected[:2] + expected[4:], strict=True):
        assert rel_error(actual, reference_value) < TOLERANCE[torch.float32]
    other = lorasc_linear(
        x, weight, b, lora_A, lora_B, SCALE, dropout_p=p, dropout_seed=seed + 1, backend="torch"
    )
    assert not torch.equal(other, outputs[0][0])


def test_dropout_seed_drawn_from_torch_generator():
    x, weight, b, lora_A, lora_B = lowrank_inputs(M, K, N, R, torch.float32)
    torch.manual_seed(3)
    first = lorasc_linear(x, weight, b, lora_A, lora_B, SCALE, dropout_p=0.5, backend="torch")
    torch.manual_seed(3)
    second = lorasc_linear(x, weight, b, lora_A, lora_B, SCALE, dropout_p=0.5, backend="torch")
    assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_noise_changes_output_as_noisy_weight_does(dtype):
    x, weight, b, lora_A, lora_B = lowrank_inputs(M, K, N, R, dtype)
    before = weight.clone()
    noise_scale_fp32 = (weight.float().std() * 0.15).item()
    scale = noise_scale_fp32
    noisy = lorasc_linear(
        x, weight, b, lora_A, lora_B, SCALE, noise_seed=8, noise_scale=scale, backend="torch"
    )
    clean = lorasc_linear(x, weight, b, lora_A, lora_B, SCALE, backend="torch")
    assert torch.equal(weight, before)
    noisy_weight = reference.noisy_weight(weight, 8, scale)
    expected = reference_float64(x, noisy_weight, b, lora_A, lora_B, SCALE)
    assert rel_error(noisy, expected) < TOLERANCE[dtype]
    assert rel_error(clean, expected) > 3 * rel_error(noisy, expected)


def test_noisy_weight_is_rounded_sum():
    weight = torch.randn(9, 13).bfloat16()
    noisy = reference.noisy_weight(weight, 5, 0.1)
    expected = (weight.float() + 0.1 * noise.noise(5, 9, 13)).bfloat16()
    assert torch.equal(noisy, expected)
    assert reference.noisy_weight(weight, None, 0.0) is weight


def test_forward_saves_only_x_xa_and_parameters():
    x, weight, b, lora_A, lora_B = lowrank_inputs(M, K, N, R, torch.float32)
    xg, ag, bbg = _with_grads(x, lora_A, lora_B)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lorasc_linear(
            xg,
            weight,
            b,
            ag,
            bbg,
            SCALE,
            dropout_p=0.3,
            dropout_seed=1,
            noise_seed=2,
            noise_scale=0.1,
            backend="torch",
        )
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(M, K), (M, R), (N, K), (R, K), (N, R)])
    by_shape = {tuple(t.shape): t for t in saved}
    assert by_shape[(M, K)].data_ptr() == xg.data_ptr()  # x itself, not a dropped copy
    assert by_shape[(N, K)].data_ptr() == weight.data_ptr()  # W itself, not a noisy copy


def test_autocast_casts_input_and_weight():
    x, weight, b, lora_A, lora_B = lowrank_inputs(M, K, N, R, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lorasc_linear(x, weight, b, lora_A, lora_B, SCALE, backend="torch")
    assert y.dtype == torch.bfloat16
    assert rel_error(y, reference_float64(x, weight, b, lora_A, lora_B, SCALE)) < 2e-2
