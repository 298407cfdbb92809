"""The LoRASC linear on fp8 e4m3 weights with per-row scales: forward and gradients on every
backend that declares the format, against float64 math on the dequantized weight within the
input dtype's tolerance (docs/design.md §7), and the refusals that name what is missing."""

import pytest
import torch
from backends import DEVICE
from helpers import KERNEL_TOLERANCE, lowrank_inputs, reference_float64, rel_error

from lorasc_kernels import lorasc_linear
from lorasc_kernels.backends import backend_module
from lorasc_kernels.backends.reference import dropout_keep_mask
from lorasc_kernels.quantize import dequantize, quantize

E4M3 = torch.float8_e4m3fn


def _fp8_backend(backend):
    if E4M3 not in backend_module(backend).SCALED_WEIGHT_DTYPES:
        pytest.skip(f"backend {backend!r} declares no fp8 weights")
    return backend


def _inputs(M, K, N, r, dtype, bias=True):
    x, weight, b, lora_A, lora_B = lowrank_inputs(M, K, N, r, dtype, DEVICE, torch.float32,
                                                  bias)
    q, scale = quantize(weight * torch.logspace(-2, 1, N, device=DEVICE)[:, None])
    return x, q, scale, b, lora_A, lora_B


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(37, 91, 53, 5), (1, 16, 3, 1)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_forward_and_gradients_match_float64_of_the_dequantized_weight(backend, dtype, shape,
                                                                       dropout):
    backend = _fp8_backend(backend)
    M, K, N, r = shape
    x, q, scale, b, lora_A, lora_B = _inputs(M, K, N, r, dtype)
    x.requires_grad_(True)
    lora_A.requires_grad_(True)
    lora_B.requires_grad_(True)
    y = lorasc_linear(x, q, b, lora_A, lora_B, 1.5, dropout_p=dropout, dropout_seed=9,
                      backend=backend, weight_scale=scale)
    assert y.dtype == dtype and y.shape == (M, N)
    dy = torch.randn(M, N, device=DEVICE).to(dtype)
    y.backward(dy)

    weight64 = dequantize(q, scale, torch.float64)
    inputs64 = [t.detach().double().requires_grad_(True) for t in (x, lora_A, lora_B)]
    keep = dropout_keep_mask(9, M, K, dropout, DEVICE) if dropout else None
    expected = reference_float64(inputs64[0], weight64, b, inputs64[1], inputs64[2], 1.5,
                                 keep, dropout)
    expected.backward(dy.double())
    tolerance = KERNEL_TOLERANCE[dtype]
    assert rel_error(y, expected) < tolerance
    for got, want in zip((x, lora_A, lora_B), inputs64, strict=True):
        assert rel_error(got.grad, want.grad) < tolerance


def test_transposed_and_strided_inputs(backend):
    backend = _fp8_backend(backend)
    x, q, scale, b, lora_A, lora_B = _inputs(21, 40, 19, 3, torch.bfloat16)
    x_strided = x.t().contiguous().t()
    q_strided = q.t().contiguous().t()
    y = lorasc_linear(x_strided, q_strided, b, lora_A, lora_B, 2.0, backend=backend,
                      weight_scale=scale)
    expected = reference_float64(x, dequantize(q, scale, torch.float64), b, lora_A, lora_B, 2.0)
    assert rel_error(y, expected) < KERNEL_TOLERANCE[torch.bfloat16]


def test_autocast_casts_x_and_keeps_the_fp8_weight():
    x, q, scale, b, lora_A, lora_B = _inputs(9, 16, 7, 2, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = lorasc_linear(x, q, b, lora_A, lora_B, 1.0, backend="torch", weight_scale=scale)
    assert y.dtype == torch.bfloat16
    assert q.dtype == E4M3


@pytest.mark.parametrize("change, error, match", [
    ({"weight_scale": None}, TypeError, "pass its per-row float32 scales as weight_scale"),
    ({"weight_scale": torch.ones(7, dtype=torch.float16)}, TypeError, "float32"),
    ({"weight_scale": torch.ones(6)}, ValueError, "weight_scale must have shape"),
    ({"noise_seed": 3, "noise_scale": 0.1}, ValueError, "noise_seed: fused noise"),
    ({"bias": torch.zeros(7)}, TypeError, "bias must have x's dtype"),
])
def test_bad_arguments_name_what_is_wrong(change, error, match):
    x, q, scale, b, lora_A, lora_B = _inputs(9, 16, 7, 2, torch.bfloat16)
    kwargs = {"bias": b, "weight_scale": scale, "backend": "torch", **change}
    bias = kwargs.pop("bias")
    with pytest.raises(error, match=match):
        lorasc_linear(x, q, bias, lora_A, lora_B, 1.0, **kwargs)


def test_a_float_weight_refuses_a_scale_and_fp8_weights_are_frozen():
    x, q, scale, b, lora_A, lora_B = _inputs(9, 16, 7, 2, torch.bfloat16)
    with pytest.raises(TypeError, match="weight_scale is given"):
        lorasc_linear(x, q.to(torch.bfloat16), b, lora_A, lora_B, 1.0, backend="torch",
                      weight_scale=scale)
    with pytest.raises(ValueError, match="scaled weights are frozen"):
        lorasc_linear(x, q.requires_grad_(True), b, lora_A, lora_B, 1.0, backend="torch",
                      weight_scale=scale)


def test_a_backend_without_fp8_refuses_it_by_name(backend):
    if E4M3 in backend_module(backend).SCALED_WEIGHT_DTYPES:
        pytest.skip(f"backend {backend!r} takes fp8 weights")
    x, q, scale, b, lora_A, lora_B = _inputs(9, 16, 7, 2, torch.bfloat16)
    with pytest.raises(TypeError, match=f"backend {backend!r} does not take"):
        lorasc_linear(x, q, b, lora_A, lora_B, 1.0, backend=backend, weight_scale=scale)


def test_compiles_with_fullgraph():
    x, q, scale, b, lora_A, lora_B = _inputs(9, 16, 7, 2, torch.bfloat16)

    def run(x):
        return lorasc_linear(x, q, b, lora_A, lora_B, 1.0, backend="torch", weight_scale=scale)

    compiled = torch.compile(run, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), run(x))
