"""``Fp8Linear``: the inference linear on fp8 weights through ``torch._scaled_mm``, against
float64 math on its quantized operands, and built from a float or an fp8 LoRASC layer."""

import pytest
import torch
from torch import nn

from lorasc_kernels import LoRASCLinear
from lorasc_kernels.fp8_linear import Fp8Linear
from lorasc_kernels.quantize import dequantize, quantize, row_scales

E4M3 = torch.float8_e4m3fn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64_of_the_quantized_operands(dtype, bias):
    torch.manual_seed(0)
    linear = nn.Linear(80, 48, bias=bias).to(dtype)
    layer = Fp8Linear.from_linear(linear)
    x = torch.randn(3, 7, 80).to(dtype)
    y = layer(x)
    assert y.shape == (3, 7, 48) and y.dtype == dtype
    rows = x.reshape(-1, 80).float()
    x_scale = row_scales(rows)
    x_q = (rows / x_scale[:, None]).to(E4M3)
    expected = (dequantize(x_q, x_scale, torch.float64)
                @ dequantize(layer.weight, layer.weight_scale, torch.float64).t())
    if bias:
        expected = expected + linear.bias.detach().double()
    error = (y.reshape(-1, 48).double() - expected).norm() / expected.norm()
    assert float(error) < (2e-2 if dtype == torch.bfloat16 else 1e-5)
    plain = linear(x).detach().double()
    assert float((y.double() - plain).norm() / plain.norm()) < 0.1  # two e4m3 operands


def test_shares_an_fp8_lorasc_layers_weight_and_scales():
    linear = nn.Linear(32, 16).to(torch.bfloat16)
    layer = LoRASCLinear.from_linear(linear, r=2, weight_format="fp8_e4m3")
    served = Fp8Linear.from_linear(layer)
    assert served.weight.data_ptr() == layer.weight.data_ptr()
    assert served.weight_scale is layer.weight_scale
    assert set(served.state_dict()) == {"weight", "weight_scale", "bias"}
    q, scale = quantize(linear.weight)
    assert torch.equal(Fp8Linear.from_linear(linear).weight_scale, scale)
    assert torch.equal(served.weight.view(torch.uint8), q.view(torch.uint8))


def test_refuses_what_is_not_the_format():
    with pytest.raises(TypeError, match="weight must be a 2-D"):
        Fp8Linear(torch.zeros(4, 8), torch.ones(4))
    with pytest.raises(ValueError, match="weight_scale must be float32 of shape"):
        Fp8Linear(torch.zeros(4, 8).to(E4M3), torch.ones(3))
