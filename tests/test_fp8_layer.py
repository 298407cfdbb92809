"""LoRASC layers on scaled weights (each fp8 format of the registry): building them
(from_linear, the constructor, inject_lorasc), their state_dict, plain layers back
(to_linear), and a Cascade over them."""

import pytest
import torch
from torch import nn

from lorasc_kernels import Cascade, LoRASCConfig, LoRASCLinear, ScaledWeight, inject_lorasc
from lorasc_kernels.formats.quantize import quantize
from lorasc_kernels.formats.registry import scaled_weight_dtype


def _linear(dtype=torch.bfloat16):
    torch.manual_seed(0)
    return nn.Linear(21, 13).to(dtype)


def _weight(layer) -> ScaledWeight:
    return ScaledWeight(layer.weight.detach(), layer.weight_scale)


def test_from_linear_quantizes_the_weight_and_shares_the_bias(scaled_dtype):
    linear = _linear()
    name = scaled_weight_dtype(scaled_dtype).name
    layer = LoRASCLinear.from_linear(linear, r=4, backend="torch", weight_format=name)
    expected = quantize(linear.weight, scaled_dtype)
    assert layer.weight.dtype == scaled_dtype and not layer.weight.requires_grad
    assert torch.equal(layer.weight.view(torch.uint8), expected.codes.view(torch.uint8))
    assert torch.equal(layer.weight_scale, expected.scale)
    assert layer.bias is linear.bias
    assert layer.lora_A.dtype == torch.bfloat16
    assert set(layer.state_dict()) == {"weight", "weight_scale", "bias", "lora_A", "lora_B"}
    assert "weight_scale" not in LoRASCLinear.from_linear(_linear(), r=4).state_dict()
    assert f"weight_format='{name}'" in repr(layer)


def test_forward_is_the_linear_of_the_dequantized_weight(scaled_dtype):
    linear = _linear()
    layer = LoRASCLinear.from_linear(
        linear, r=4, backend="torch", weight_format=scaled_weight_dtype(scaled_dtype).name
    )
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 21).to(torch.bfloat16)
    weight = _weight(layer).dequantize(torch.float64)
    with torch.no_grad():
        expected = (
            x.double() @ weight.t()
            + linear.bias.double()
            + layer.scaling * (x.double() @ layer.lora_A.double().t()) @ layer.lora_B.double().t()
        )
    y = layer(x)
    assert float((y.detach().double() - expected).norm() / expected.norm()) < 2e-2
    y.float().sum().backward()
    assert layer.lora_A.grad is not None and layer.weight.grad is None


def test_state_dict_round_trip_into_a_new_layer(scaled_dtype):
    name = scaled_weight_dtype(scaled_dtype).name
    layer = LoRASCLinear.from_linear(_linear(), r=4, backend="torch", weight_format=name)
    fresh = LoRASCLinear(21, 13, r=4, backend="torch", dtype=torch.bfloat16, weight_format=name)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 21).to(torch.bfloat16)
    assert torch.equal(fresh(x), layer(x))


def test_to_linear_dequantizes_into_the_dtype_asked(scaled_dtype):
    linear = _linear()
    layer = LoRASCLinear.from_linear(
        linear, r=4, weight_format=scaled_weight_dtype(scaled_dtype).name
    )
    default = layer.to_linear()
    assert default.weight.dtype == torch.bfloat16
    assert torch.equal(default.weight, _weight(layer).dequantize(torch.bfloat16))
    as_float = layer.to_linear(torch.float32)
    assert as_float.weight.dtype == as_float.bias.dtype == torch.float32
    with pytest.raises(TypeError, match="dtype"):
        layer.to_linear(torch.int8)


def test_unknown_formats_are_refused_by_name():
    with pytest.raises(ValueError, match="weight_format"):
        LoRASCLinear.from_linear(_linear(), weight_format="int4")
    with pytest.raises(ValueError, match="weight_format"):
        LoRASCConfig(weight_format="fp8_e3m4")


def test_cuda_backend_refuses_an_fp8_layer_by_name(scaled_dtype):
    layer = LoRASCLinear.from_linear(
        _linear(), r=4, backend="cuda", weight_format=scaled_weight_dtype(scaled_dtype).name
    )
    with pytest.raises((TypeError, RuntimeError), match="cuda"):
        layer(torch.randn(2, 21).to(torch.bfloat16))


def _model(scaled_dtype):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).to(torch.bfloat16)
    inject_lorasc(
        model,
        LoRASCConfig(
            r=2,
            target_modules=["0"],
            backend="torch",
            weight_format=scaled_weight_dtype(scaled_dtype).name,
        ),
    )
    return model


def test_inject_and_a_cascade_merge_into_fp8_and_finalize_to_dequantized_linears(scaled_dtype):
    model = _model(scaled_dtype)
    assert model[0].weight.dtype == scaled_dtype and isinstance(model[2], nn.Linear)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    cascade = Cascade(model, optimizer, steps_per_cascade=2, noise_lambda=0.1, noise_mode="inplace")
    start = _weight(model[0]).dequantize(torch.float32)
    for _ in range(5):
        model(torch.randn(8, 16).to(torch.bfloat16)).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        cascade.step()
    assert cascade.cascade_index == 2 and model[0].weight.dtype == scaled_dtype
    assert not torch.equal(_weight(model[0]).dequantize(torch.float32), start)
    finalized = cascade.finalize()
    assert type(finalized[0]) is nn.Linear and finalized[0].weight.dtype == torch.bfloat16


def test_a_cascade_refuses_fused_noise_on_fp8_layers(scaled_dtype):
    model = _model(scaled_dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(ValueError, match="noise_mode='fused' is not supported"):
        Cascade(model, optimizer, steps_per_cascade=2, noise_lambda=0.1, noise_mode="fused")
