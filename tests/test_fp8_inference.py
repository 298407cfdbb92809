"""``Fp8Linear``: the inference linear on a scaled weight (each fp8 format of the registry)
through ``torch._scaled_mm``, against float64 math on its quantized operands, and built
from a float or an fp8 LoRASC layer."""

import pytest
import torch
from torch import nn

from lorasc_kernels import LoRASCLinear, ScaledWeight
from lorasc_kernels.formats.quantize import quantize, row_scales
from lorasc_kernels.formats.registry import WEIGHT_FORMATS, scaled_weight_dtype
from lorasc_kernels.fp8_linear import INPUT_FORMAT, Fp8Linear


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64_of_the_quantized_operands(scaled_dtype, dtype, bias):
    torch.manual_seed(0)
    linear = nn.Linear(80, 48, bias=bias).to(dtype)
    layer = Fp8Linear.from_linear(linear, scaled_weight_dtype(scaled_dtype).name)
    assert layer.weight.dtype == scaled_dtype
    x = torch.randn(3, 7, 80).to(dtype)
    y = layer(x)
    assert y.shape == (3, 7, 48) and y.dtype == dtype
    rows = x.reshape(-1, 80).float()
    x_dtype = WEIGHT_FORMATS[INPUT_FORMAT]
    x_scale = row_scales(rows, x_dtype)
    x_q = ScaledWeight((rows / x_scale[:, None]).to(x_dtype), x_scale)
    weight = ScaledWeight(layer.weight, layer.weight_scale)
    expected = x_q.dequantize(torch.float64) @ weight.dequantize(torch.float64).t()
    if bias:
        expected = expected + linear.bias.detach().double()
    error = (y.reshape(-1, 48).double() - expected).norm() / expected.norm()
    assert float(error) < (2e-2 if dtype == torch.bfloat16 else 1e-5)
    plain = linear(x).detach().double()
    error = float((y.double() - plain).norm() / plain.norm())  # two fp8 operands
    assert error < 0.8 * 2.0 ** -scaled_weight_dtype(scaled_dtype).mantissa_bits  # 0.1, 0.2


def test_shares_an_fp8_lorasc_layers_weight_and_scales(scaled_dtype):
    linear = nn.Linear(32, 16).to(torch.bfloat16)
    name = scaled_weight_dtype(scaled_dtype).name
    layer = LoRASCLinear.from_linear(linear, r=2, weight_format=name)
    served = Fp8Linear.from_linear(layer)
    assert served.weight.data_ptr() == layer.weight.data_ptr()
    assert served.weight_scale is layer.weight_scale
    assert set(served.state_dict()) == {"weight", "weight_scale", "bias"}
    expected = quantize(linear.weight, scaled_dtype)
    assert torch.equal(Fp8Linear.from_linear(linear, name).weight_scale, expected.scale)
    assert torch.equal(served.weight.view(torch.uint8), expected.codes.view(torch.uint8))


def test_refuses_what_is_not_a_scaled_weight():
    with pytest.raises(TypeError, match="weight must be a ScaledWeight"):
        Fp8Linear(torch.zeros(4, 8), torch.ones(4))
    with pytest.raises(ValueError, match="weight_format"):
        Fp8Linear.from_linear(nn.Linear(8, 4), "int8")
