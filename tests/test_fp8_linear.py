"""The LoRASC linear on scaled weights (each fp8 format of the registry, per-row scales):
forward and gradients on every backend that declares the format, against float64 math on the
dequantized weight within the input dtype's tolerance (docs/design.md §7), and the refusals
that name what is missing."""

import pytest
import torch
from helpers import KERNEL_TOLERANCE, lowrank_inputs, reference_float64, rel_error, scaled_backend

from lorasc_kernels import ScaledWeight, lorasc_linear
from lorasc_kernels.backends import backend_module
from lorasc_kernels.backends.reference import dropout_keep_mask
from lorasc_kernels.formats.quantize import quantize
from tests.backend_params import DEVICE


def _inputs(dtype, M, K, N, r, x_dtype, bias=True):
    """``(x, ScaledWeight, b, lora_A, lora_B)``; rows of the weight span three decades."""
    x, weight, b, lora_A, lora_B = lowrank_inputs(M, K, N, r, x_dtype, DEVICE, torch.float32, bias)
    scaled = quantize(weight * torch.logspace(-2, 1, N, device=DEVICE)[:, None], dtype)
    return x, scaled, b, lora_A, lora_B


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(37, 91, 53, 5), (1, 16, 3, 1)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_forward_and_gradients_match_float64_of_the_dequantized_weight(
    backend, scaled_dtype, x_dtype, shape, dropout
):
    backend = scaled_backend(backend, scaled_dtype)
    M, K, N, r = shape
    x, weight, b, lora_A, lora_B = _inputs(scaled_dtype, M, K, N, r, x_dtype)
    x.requires_grad_(True)
    lora_A.requires_grad_(True)
    lora_B.requires_grad_(True)
    y = lorasc_linear(
        x, weight, b, lora_A, lora_B, 1.5, dropout_p=dropout, dropout_seed=9, backend=backend
    )
    assert y.dtype == x_dtype and y.shape == (M, N)
    dy = torch.randn(M, N, device=DEVICE).to(x_dtype)
    y.backward(dy)

    inputs64 = [t.detach().double().requires_grad_(True) for t in (x, lora_A, lora_B)]
    keep = dropout_keep_mask(9, M, K, dropout, DEVICE) if dropout else None
    expected = reference_float64(
        inputs64[0],
        weight.dequantize(torch.float64),
        b,
        inputs64[1],
        inputs64[2],
        1.5,
        keep,
        dropout,
    )
    expected.backward(dy.double())
    tolerance = KERNEL_TOLERANCE[x_dtype]
    assert rel_error(y, expected) < tolerance
    for got, want in zip((x, lora_A, lora_B), inputs64, strict=True):
        assert rel_error(got.grad, want.grad) < tolerance


def test_transposed_and_strided_inputs(backend, scaled_dtype):
    backend = scaled_backend(backend, scaled_dtype)
    x, weight, b, lora_A, lora_B = _inputs(scaled_dtype, 21, 40, 19, 3, torch.bfloat16)
    strided = ScaledWeight(weight.codes.t().contiguous().t(), weight.scale)
    y = lorasc_linear(x.t().contiguous().t(), strided, b, lora_A, lora_B, 2.0, backend=backend)
    expected = reference_float64(x, weight.dequantize(torch.float64), b, lora_A, lora_B, 2.0)
    assert rel_error(y, expected) < KERNEL_TOLERANCE[torch.bfloat16]


def test_autocast_casts_x_and_keeps_the_scaled_weight(scaled_dtype):
    x, weight, b, lora_A, lora_B = _inputs(scaled_dtype, 9, 16, 7, 2, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = lorasc_linear(x, weight, b, lora_A, lora_B, 1.0, backend="torch")
    assert y.dtype == torch.bfloat16
    assert weight.codes.dtype == scaled_dtype


def test_bad_arguments_name_what_is_wrong(scaled_dtype):
    x, weight, b, lora_A, lora_B = _inputs(scaled_dtype, 9, 16, 7, 2, torch.bfloat16)
    with pytest.raises(TypeError, match=r"scaled dtype .*ScaledWeight\(codes, scale\)"):
        lorasc_linear(x, weight.codes, b, lora_A, lora_B, 1.0, backend="torch")
    with pytest.raises(TypeError, match="ScaledWeight scale must be a float32"):
        ScaledWeight(weight.codes, weight.scale.half())
    with pytest.raises(ValueError, match=r"ScaledWeight scale must have shape \(7,\)"):
        ScaledWeight(weight.codes, weight.scale[:6])
    with pytest.raises(ValueError, match="noise_seed: fused noise"):
        lorasc_linear(
            x, weight, b, lora_A, lora_B, 1.0, backend="torch", noise_seed=3, noise_scale=0.1
        )
    with pytest.raises(TypeError, match="bias must have x's dtype"):
        lorasc_linear(
            x, weight, torch.zeros(7, device=DEVICE), lora_A, lora_B, 1.0, backend="torch"
        )


def test_scaled_weights_are_frozen(scaled_dtype):
    x, weight, b, lora_A, lora_B = _inputs(scaled_dtype, 9, 16, 7, 2, torch.bfloat16)
    weight.codes.requires_grad_(True)
    with pytest.raises(ValueError, match="scaled weights are frozen"):
        lorasc_linear(x, weight, b, lora_A, lora_B, 1.0, backend="torch")


def test_a_backend_without_the_format_refuses_it_by_name(backend, scaled_dtype):
    if scaled_dtype in backend_module(backend).SCALED_WEIGHT_DTYPES:
        pytest.skip(f"backend {backend!r} takes {scaled_dtype} weights")
    x, weight, b, lora_A, lora_B = _inputs(scaled_dtype, 9, 16, 7, 2, torch.bfloat16)
    with pytest.raises(TypeError, match=f"backend {backend!r} does not take"):
        lorasc_linear(x, weight, b, lora_A, lora_B, 1.0, backend=backend)


def test_compiles_with_fullgraph(scaled_dtype):
    x, weight, b, lora_A, lora_B = _inputs(scaled_dtype, 9, 16, 7, 2, torch.bfloat16)
    codes, scale = weight.codes, weight.scale

    def run(x):  # the container built inside the graph, as LoRASCLinear.forward does
        return lorasc_linear(x, ScaledWeight(codes, scale), b, lora_A, lora_B, 1.0, backend="torch")

    compiled = torch.compile(run, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), run(x))
