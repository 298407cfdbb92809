"""LoRASCLinear: construction, from_linear, init, state_dict, autocast, noise, to_linear."""

import math

import pytest
import torch
from torch import nn

from lorasc_kernels import LoRASCLinear
from lorasc_kernels.backends import reference
from tests.helpers import reference_float64, rel_error


def test_shapes_init_and_frozen_base():
    layer = LoRASCLinear(91, 53, r=5, lora_alpha=10)
    assert layer.lora_A.shape == (5, 91) and layer.lora_B.shape == (53, 5)
    assert layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(91)  # kaiming_uniform(a=√5) on fan_in=91
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}


def test_forward_matches_float64_and_nn_linear_at_init():
    layer = LoRASCLinear(91, 53, r=5)
    x = torch.randn(4, 37, 91)
    linear = nn.Linear(91, 53)
    linear.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    assert torch.allclose(layer(x), linear(x), atol=1e-6)
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = reference_float64(
        x.reshape(-1, 91), layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling
    )
    assert rel_error(layer(x).reshape(-1, 53), expected) < 1e-5


def test_parametrized_and_functionally_called_parameters_are_the_ones_used():
    """The forward reads its parameters from the module's registries, and by attribute where
    a name has left them (``torch.nn.utils.parametrize``); ``torch.func.functional_call``
    swaps them in the registries: both are seen, as ``self.<name>`` would see them."""
    torch.manual_seed(0)
    layer = LoRASCLinear(12, 10, r=3)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 12)
    doubled = LoRASCLinear(12, 10, r=3)
    doubled.load_state_dict(layer.state_dict())
    with torch.no_grad():
        doubled.lora_B.mul_(2)
        doubled.bias.zero_()
    params = {name: p.detach().clone() for name, p in doubled.named_parameters()}
    swapped = torch.func.functional_call(layer, params, (x,))
    torch.testing.assert_close(swapped, doubled(x), rtol=0, atol=0)

    class Twice(nn.Module):
        def forward(self, value):
            return 2 * value

    torch.nn.utils.parametrize.register_parametrization(layer, "lora_B", Twice())
    with torch.no_grad():
        layer.bias.zero_()
    torch.testing.assert_close(layer(x), doubled(x), rtol=0, atol=0)
    layer(x).sum().backward()
    assert layer.parametrizations.lora_B.original.grad is not None


def test_from_linear_shares_storage():
    linear = nn.Linear(20, 30, dtype=torch.bfloat16)
    layer = LoRASCLinear.from_linear(linear, r=4, lora_alpha=8)
    assert layer.weight.data_ptr() == linear.weight.data_ptr()
    assert layer.bias.data_ptr() == linear.bias.data_ptr()
    assert layer.lora_A.dtype == torch.bfloat16 and layer.lora_A.device == linear.weight.device
    no_bias = LoRASCLinear.from_linear(nn.Linear(20, 30, bias=False), r=2)
    assert no_bias.bias is None
    with pytest.raises(TypeError, match="linear"):
        LoRASCLinear.from_linear(nn.Conv1d(2, 2, 1))


def test_fp32_lora_over_bf16_weight_trains():
    layer = LoRASCLinear(16, 8, r=4, dtype=torch.bfloat16, lora_dtype=torch.float32)
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    y = layer(torch.randn(3, 16).bfloat16())
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and layer.lora_B.grad.dtype == torch.float32
    assert layer.lora_B.grad.abs().sum() > 0


def test_state_dict_round_trip_keeps_linear_keys():
    layer = LoRASCLinear(12, 10, r=3)
    with torch.no_grad():
        layer.lora_B.normal_()
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "lora_A", "lora_B"}
    other = LoRASCLinear(12, 10, r=3)
    other.load_state_dict(state)
    x = torch.randn(5, 12)
    assert torch.equal(layer(x), other(x))
    linear = nn.Linear(12, 10)
    linear.load_state_dict(state, strict=False)
    assert torch.equal(linear.weight, layer.weight)


def test_autocast_bf16():
    layer = LoRASCLinear(16, 8, r=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(3, 16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.dtype == torch.float32


def test_dropout_only_in_training():
    layer = LoRASCLinear(16, 8, r=4, lora_dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))  # a fresh mask per call


def test_set_noise_uses_noisy_weight_and_leaves_weight():
    layer = LoRASCLinear(16, 8, r=4)
    before = layer.weight.clone()
    x = torch.randn(5, 16)
    clean = layer(x)
    layer.set_noise(3, 0.1)
    noisy = layer(x)
    noisy_weight = reference.noisy_weight(layer.weight, 3, 0.1)
    assert torch.allclose(noisy, x @ noisy_weight.t() + layer.bias, atol=1e-6)
    assert torch.equal(layer.weight, before) and not torch.allclose(noisy, clean)
    assert "noise_scale" in repr(layer)
    layer.set_noise(None)
    assert torch.equal(layer(x), clean)


def test_to_linear_shares_storage():
    layer = LoRASCLinear(16, 8, r=4, dtype=torch.float16)
    linear = layer.to_linear()
    assert type(linear) is nn.Linear and linear.weight.dtype == torch.float16
    assert linear.weight.data_ptr() == layer.weight.data_ptr()
    assert linear.bias.data_ptr() == layer.bias.data_ptr()


def test_extra_repr():
    text = repr(LoRASCLinear(16, 8, r=4, lora_alpha=32, lora_dropout=0.1))
    assert "r=4" in text and "lora_alpha=32" in text and "lora_dropout=0.1" in text


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"r": 0}, ValueError, "r must be >= 1"),
        ({"r": 17}, ValueError, "r must be <= 8"),
        ({"r": 2.5}, TypeError, "r must be an int"),
        ({"lora_dropout": 1.0}, ValueError, "lora_dropout"),
        ({"lora_dropout": -0.1}, ValueError, "lora_dropout"),
        ({"lora_alpha": float("inf")}, ValueError, "lora_alpha"),
        ({"backend": "tpu"}, ValueError, "backend"),
        ({"lora_dtype": torch.int32}, TypeError, "lora_dtype"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoRASCLinear(16, 8, **{"r": 4, **kwargs})


def test_bad_set_noise():
    layer = LoRASCLinear(16, 8, r=4)
    with pytest.raises(ValueError, match="scale"):
        layer.set_noise(1, -0.5)
    with pytest.raises(TypeError, match="seed"):
        layer.set_noise("1", 0.5)


def test_failed_set_noise_changes_nothing():
    layer = LoRASCLinear(16, 8, r=4)
    layer.set_noise(3, 0.1)
    with pytest.raises(ValueError, match="scale"):
        layer.set_noise(5, -1.0)
    assert (layer.noise_seed, layer.noise_scale) == (3, 0.1)
