"""The fp8 compute mode of LoRASC layers (``compute="fp8"``, docs/fp8.md): refused by name
without a scaled weight; its outputs and gradients are the quantized math (x and dY ⊙ s_W
quantized per row to e4m3, float64 on the exact operands) on the torch and Triton backends;
merges, a Cascade, finalize, the merged state, resume and torch.compile(fullgraph=True)
work in it as in the storage mode. FSDP2: tests/test_distributed.py's ``compute`` scenario.
"""

import copy
import importlib.util
import io

import pytest
import torch
from torch import nn

from lorasc_kernels import (
    Cascade,
    LoRASCConfig,
    LoRASCLinear,
    ScaledWeight,
    inject_lorasc,
    lorasc_linear,
    merge_lowrank_,
)
from lorasc_kernels.backends import backend_module
from lorasc_kernels.formats.quantize import quantize_rows
from lorasc_kernels.formats.registry import scaled_weight_dtype

# The backends that run on CPU tensors here: the reference, and Triton in its interpreter
# (without a GPU; on a GPU tests/backends/test_fp8_compute.py runs the kernels themselves).
BACKENDS = [
    name
    for name in ("torch", "triton")
    if importlib.util.find_spec(name) is not None
    and backend_module(name).unavailable_reason(torch.device("cpu")) is None
]
IN, OUT, R = 37, 29, 5
# Elementwise bounds of the output's rounding and float32's summation order, relative to
# the element and to the output's mean magnitude (far below the ~2 % that quantizing x adds).
TOLERANCE = {torch.bfloat16: 2.0**-8, torch.float32: 1e-5}


def _layer(scaled_dtype, backend, dtype=torch.bfloat16, compute="fp8"):
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT).to(dtype)
    name = scaled_weight_dtype(scaled_dtype).name
    layer = LoRASCLinear.from_linear(
        linear, r=R, backend=backend, weight_format=name, compute=compute
    )
    nn.init.normal_(layer.lora_B, std=0.2)
    return layer


def _close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tolerance = TOLERANCE[dtype]
    error = (got.detach().double() - expected).abs()
    bound = tolerance * (expected.abs() + expected.abs().mean())
    assert (error <= bound).all(), float((error / bound).max())


def _expected(layer, x, dy):
    """``y``, ``dx``, ``dA``, ``dB`` in float64 on the exact quantized operands; ``xa`` and
    ``dY_B`` rounded to ``x``'s dtype, as the layer keeps them."""
    weight = ScaledWeight(layer.weight.detach(), layer.weight_scale)
    s = layer.scaling
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    rows = quantize_rows(x.detach().float()).dequantize(torch.float64)
    xa = (x.double() @ A.t()).to(x.dtype).double()
    y = rows @ weight.dequantize(torch.float64).t() + layer.bias.double() + s * xa @ B.t()
    grads = quantize_rows(dy.float() * weight.scale).dequantize(torch.float64)
    dy_b = (dy.double() @ B).to(x.dtype).double()
    dx = grads @ weight.codes.double() + s * dy_b @ A
    return y, dx, s * dy_b.t() @ x.double(), s * dy.double().t() @ xa


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_outputs_and_gradients_are_the_quantized_math(scaled_dtype, backend, dtype):
    layer = _layer(scaled_dtype, backend, dtype)
    x = torch.randn(23, IN).to(dtype).requires_grad_(True)
    dy = torch.randn(23, OUT).to(dtype)
    y = layer(x)
    y.backward(dy)
    y64, dx64, da64, db64 = _expected(layer, x, dy)
    _close(y, y64, dtype)
    _close(x.grad, dx64, dtype)
    _close(layer.lora_A.grad, da64, dtype)  # dA, dB: the storage mode's products
    _close(layer.lora_B.grad, db64, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_after_a_merge_the_gemms_read_the_merged_codes(scaled_dtype, backend):
    """No transposed copy of the codes exists: dX reads W's codes by strides, so a merge
    (which rewrites codes and scales, rescaling rows) is what the next forward and backward
    use."""
    layer = _layer(scaled_dtype, backend)
    weight = ScaledWeight(layer.weight.detach(), layer.weight_scale)
    before = weight.codes.clone()
    lora_B = 50 * torch.randn(OUT, R)  # large: rows grow past the format's range, rescaled
    scales = weight.scale.clone()
    merge_lowrank_(weight, lora_B, torch.randn(R, IN), 1.0, seed=3, backend=backend)
    assert not torch.equal(before.view(torch.uint8), weight.codes.view(torch.uint8))
    assert (weight.scale > scales).any()
    x = torch.randn(9, IN).to(torch.bfloat16).requires_grad_(True)
    dy = torch.randn(9, OUT).to(torch.bfloat16)
    y = layer(x)
    y.backward(dy)
    y64, dx64, _, _ = _expected(layer, x, dy)
    _close(y, y64, torch.bfloat16)
    _close(x.grad, dx64, torch.bfloat16)


def test_compute_without_a_scaled_weight_is_refused_by_name():
    linear = nn.Linear(8, 6)
    message = "compute='fp8' multiplies fp8 codes: it needs a scaled weight"
    with pytest.raises(ValueError, match=message):
        LoRASCLinear(8, 6, r=2, compute="fp8")
    with pytest.raises(ValueError, match=message):
        LoRASCLinear.from_linear(linear, r=2, compute="fp8")
    assert linear.weight.requires_grad  # refused before anything changed
    with pytest.raises(ValueError, match=message):
        LoRASCConfig(compute="fp8")
    x, A, B = torch.randn(3, 8), torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(ValueError, match=message):
        lorasc_linear(x, linear.weight.detach(), None, A, B, 1.0, compute="fp8")
    with pytest.raises(ValueError, match="compute must be None or one of"):
        LoRASCLinear(8, 6, r=2, weight_format="fp8_e4m3", compute="fp16")


def _model(compute, weight_format="fp8_e4m3"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, 16), nn.Tanh(), nn.Linear(16, OUT))
    inject_lorasc(
        model,
        LoRASCConfig(
            r=3,
            lora_alpha=6,
            target_modules=["0", "2"],
            backend="torch",
            weight_format=weight_format,
            compute=compute,
        ),
    )
    return model


def _run(model, batches, seed=4):
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    cascade = Cascade(model, optimizer, steps_per_cascade=3, seed=seed, noise_lambda=0.1)
    _steps(model, optimizer, cascade, batches)
    return optimizer, cascade


def _steps(model, optimizer, cascade, batches):
    for x in batches:
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        cascade.step()


def test_inject_a_cascade_merged_state_and_finalize(scaled_dtype):
    model = _model("fp8", scaled_weight_dtype(scaled_dtype).name)
    assert all(model[i].compute == "fp8" for i in (0, 2))
    start = model[0].weight.detach().clone()
    batches = [torch.randn(8, IN) for _ in range(7)]
    _, cascade = _run(model, batches)
    assert cascade.cascade_index == 2 and model[0].weight.dtype == scaled_dtype
    assert not torch.equal(model[0].weight.view(torch.uint8), start.view(torch.uint8))
    merged = cascade.merged_state_dict(device="cpu")
    finalized = cascade.finalize()
    assert type(finalized[0]) is nn.Linear
    for key, value in finalized.state_dict().items():
        assert torch.equal(merged[key], value), key


def test_training_differs_from_the_storage_mode_only_by_the_quantized_inputs():
    """Same seeds, same batches: a compute-mode run and a storage-mode run merge different
    updates (their gradients differ), so compute mode is really on."""
    batches = [torch.randn(8, IN) for _ in range(4)]
    compute, storage = _model("fp8"), _model(None)
    _run(compute, batches)
    _run(storage, batches)
    assert torch.equal(compute[0].lora_A, storage[0].lora_A)  # drawn at the boundary
    assert not torch.equal(compute[0].lora_B, storage[0].lora_B)  # trained since
    codes = [layer.weight.view(torch.uint8) for layer in (compute[0], storage[0])]
    assert not torch.equal(*codes)  # the first boundary merged different updates


def test_resume_mid_cascade_is_bit_exact():
    batches = [torch.randn(8, IN) for _ in range(8)]
    uninterrupted = _model("fp8")
    _run(uninterrupted, batches)

    first = _model("fp8")
    optimizer, cascade = _run(first, batches[:4])  # one step into the second cascade
    buffer = io.BytesIO()
    torch.save(
        {
            "model": first.state_dict(),
            "optimizer": optimizer.state_dict(),
            "cascade": cascade.state_dict(),
        },
        buffer,
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    torch.manual_seed(999)  # other initial weights, then the saved state
    resumed = _model("fp8")
    resumed.load_state_dict(saved["model"])
    optimizer = torch.optim.Adam([p for p in resumed.parameters() if p.requires_grad], lr=2e-2)
    optimizer.load_state_dict(saved["optimizer"])
    cascade = Cascade.from_state_dict(resumed, optimizer, saved["cascade"])
    _steps(resumed, optimizer, cascade, batches[4:])
    expected = uninterrupted.state_dict()
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_with_fullgraph_forward_and_backward(backend):
    """The custom ops carry the mode into the traced forward and backward: the compiled
    model's outputs and gradients are the eager ones."""
    model = _model("fp8")
    for index in (0, 2):
        model[index].backend = backend
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    x = torch.randn(8, IN)
    y, y_compiled = model(x), compiled(x)
    assert torch.equal(y_compiled, y)
    y.pow(2).sum().backward()
    y_compiled.pow(2).sum().backward()
    for (name, parameter), twin_parameter in zip(
        model.named_parameters(), twin.parameters(), strict=True
    ):
        if parameter.requires_grad:
            assert torch.equal(twin_parameter.grad, parameter.grad), name


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
def test_triton_runs_dropout_as_the_reference_does(scaled_dtype):
    """LoRA dropout in the compute mode: the mask is drawn from the same seed, applied to
    ``x`` in the pass that quantizes it and to the rank term of dX; Triton's outputs and
    gradients are the reference's within bf16's tolerance (design.md §7: ``xa`` and ``dY_B``,
    kept in bf16, may round one unit apart, which the rank term carries into ``y`` and
    ``dx``)."""
    results = []
    for backend in ("torch", "triton"):
        layer = _layer(scaled_dtype, backend)
        layer.lora_dropout = 0.3
        torch.manual_seed(7)  # the layer draws its dropout seed from torch's generator
        x = torch.randn(23, IN).to(torch.bfloat16).requires_grad_(True)
        y = layer(x)
        y.backward(torch.randn(23, OUT).to(torch.bfloat16))
        results.append([y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad])
    for got, expected in zip(*reversed(results), strict=True):
        tolerance = 2e-2 * expected.float().abs().amax().item()
        torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=tolerance)
