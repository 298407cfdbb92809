"""Hostile use of the fp8 paths (each scaled format of the registry) and the merge's
layouts: tiny row scales, strided and zero-stride scales, bad scale values, infinite and NaN
codes, overlapping and float64 weights, and ``Fp8Linear``'s arguments. Every refusal names
the argument and leaves weights and scales bit-identical (:func:`test_hostile.refused`);
every accepted call gives the same values on every backend that takes it
(docs/reliability.md, docs/fp8.md)."""

import pytest
import torch
from helpers import scaled_backend, scaled_step
from test_hostile import refused
from torch import nn

from lorasc_kernels import Cascade, LoRASCLinear, ScaledWeight, lorasc_linear, merge_lowrank_
from lorasc_kernels.formats.quantize import quantize
from lorasc_kernels.formats.registry import scaled_weight_dtype
from lorasc_kernels.fp8_linear import Fp8Linear
from tests.backend_params import DEVICE

MIN_SCALE = 2.0**-64  # every format's smallest row scale
ROWS, COLS, RANK = 19, 12, 2  # more rows than one program of the Triton scaled merge
TINY_ROW = 3


def _tiny_row_weight(seed=0):
    """(ROWS, COLS) float32 weight whose row ``TINY_ROW`` holds values of about 1e-39."""
    weight = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(seed))
    weight[TINY_ROW] *= 1e-39
    return weight


def _scaled(dtype, weight=None, update=1.0, seed=0):
    """``(codes, scale, lora_B, lora_A)``: the parts, so tests can pass them in odd layouts."""
    generator = torch.Generator().manual_seed(seed + 1)
    scaled = quantize(
        torch.randn(ROWS, COLS, generator=generator) if weight is None else weight, dtype
    )
    lora_B = torch.randn(ROWS, RANK, generator=generator) * update
    lora_A = torch.randn(RANK, COLS, generator=generator)
    return (scaled.codes.to(DEVICE), scaled.scale.to(DEVICE), lora_B.to(DEVICE), lora_A.to(DEVICE))


def _same(got: tuple, expected: tuple):
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _within_one_step(q, scale, expected):
    """The dequantized ``(q, scale)`` is within one step of its format of float64
    ``expected``."""
    error = (ScaledWeight(q, scale).dequantize(torch.float64) - expected).abs()
    step = scaled_step(q.dtype, expected, scale)
    return bool((error <= step * (1 + 1e-6)).all())


# -- 1. tiny row scales ----------------------------------------------------------------------


def test_quantize_gives_a_row_of_tiny_values_the_smallest_scale(scaled_dtype):
    scaled = quantize(_tiny_row_weight(), scaled_dtype)
    assert float(scaled.scale[TINY_ROW]) == MIN_SCALE == scaled.format.min_scale
    assert bool((scaled.scale >= MIN_SCALE).all())
    # 1e-39 is below the smallest code times the floor (2**-73 for e4m3, 2**-80 for e5m2)
    assert torch.equal(scaled.codes[TINY_ROW].float(), torch.zeros(COLS))


def test_a_merge_into_a_row_of_tiny_values_is_exact_on_every_backend(backend, scaled_dtype):
    backend = scaled_backend(backend, scaled_dtype)
    q, scale, lora_B, lora_A = _scaled(scaled_dtype, _tiny_row_weight())
    expected = (
        ScaledWeight(q, scale).dequantize(torch.float64) + 0.5 * lora_B.double() @ lora_A.double()
    )
    got = q.clone(), scale.clone()
    merge_lowrank_(ScaledWeight(*got), lora_B, lora_A, 0.5, backend=backend)
    assert _within_one_step(*got, expected)
    reference = q.clone(), scale.clone()
    merge_lowrank_(ScaledWeight(*reference), lora_B, lora_A, 0.5, backend="torch")
    _same(got, reference)


def test_finalize_of_an_fp8_layer_with_a_row_of_tiny_values_writes_the_update(scaled_dtype):
    linear = nn.Linear(COLS, ROWS, bias=False)
    with torch.no_grad():
        linear.weight.copy_(_tiny_row_weight())
    model = nn.Sequential(
        LoRASCLinear.from_linear(
            linear, r=RANK, weight_format=scaled_weight_dtype(scaled_dtype).name
        )
    )
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(ROWS, RANK))
    expected = (
        ScaledWeight(layer.weight, layer.weight_scale).dequantize(torch.float64)
        + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    )
    optimizer = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.0)
    finalized = Cascade(model, optimizer, steps_per_cascade=2).finalize()
    assert _within_one_step(layer.weight, layer.weight_scale, expected)
    assert torch.equal(
        finalized[0].weight,
        ScaledWeight(layer.weight, layer.weight_scale).dequantize(torch.float32),
    )


def test_a_scale_below_the_smallest_is_refused_by_the_merge_and_the_linear(backend, scaled_dtype):
    backend = scaled_backend(backend, scaled_dtype)
    q, scale, lora_B, lora_A = _scaled(scaled_dtype)
    scale[TINY_ROW] = 1e-30
    refused(
        ValueError,
        rf"weight.scale must be positive and finite, at least 2\*\*-64.*row "
        f"{TINY_ROW}",
        lambda: merge_lowrank_(ScaledWeight(q, scale), lora_B, lora_A, 0.5, backend=backend),
        q,
        scale,
    )
    x = torch.randn(3, COLS, device=DEVICE)
    refused(
        ValueError,
        "weight.scale must be positive and finite",
        lambda: lorasc_linear(
            x, ScaledWeight(q, scale), None, lora_A, lora_B, 1.0, backend=backend
        ),
        q,
        scale,
    )


def test_a_merge_whose_values_over_the_scale_overflow_float32_is_refused(backend, scaled_dtype):
    """``v / scale`` of a row with a scale ~ 5e-3 (e4m3) and values ~ 1e37 exceeds float32's
    range, though the values themselves fit: refused before any write, not rescaled from an
    inf."""
    backend = scaled_backend(backend, scaled_dtype)
    q, scale, lora_B, lora_A = _scaled(scaled_dtype)
    refused(
        ValueError,
        "could overflow float32 at row 0",
        lambda: merge_lowrank_(ScaledWeight(q, scale), lora_B, lora_A, 1e37, backend=backend),
        q,
        scale,
    )


# -- 2. strided and zero-stride scales -------------------------------------------------------


def test_a_scale_with_a_zero_stride_is_refused_by_the_merge(backend, scaled_dtype):
    backend = scaled_backend(backend, scaled_dtype)
    q, scale, lora_B, lora_A = _scaled(scaled_dtype)
    refused(
        ValueError,
        r"weight.scale has overlapping elements.*strides \(0,\)",
        lambda: merge_lowrank_(
            ScaledWeight(q, scale[:1].expand(ROWS)), lora_B, lora_A, 0.5, backend=backend
        ),
        q,
        scale,
    )


def test_a_strided_scale_merges_as_its_contiguous_copy(backend, scaled_dtype):
    backend = scaled_backend(backend, scaled_dtype)
    q, scale, lora_B, lora_A = _scaled(scaled_dtype, update=30.0)  # some rows rescaled
    big = torch.stack([scale, torch.full_like(scale, 7.0)], dim=1).reshape(-1)
    got = q.clone(), big[::2]
    merge_lowrank_(ScaledWeight(*got), lora_B, lora_A, 0.5, backend=backend)
    expected = q.clone(), scale.clone()
    merge_lowrank_(ScaledWeight(*expected), lora_B, lora_A, 0.5, backend="torch")
    _same(got, expected)
    assert torch.equal(big[1::2], torch.full_like(scale, 7.0))  # the other elements kept


@pytest.mark.parametrize("layout", ["every_other", "expanded"])
def test_the_linear_reads_a_strided_or_expanded_scale_as_its_contiguous_copy(
    backend, scaled_dtype, layout
):
    backend = scaled_backend(backend, scaled_dtype)
    q, scale, lora_B, lora_A = _scaled(scaled_dtype)
    if layout == "expanded":
        scale = torch.full_like(scale, float(scale[0]))
        strided = scale[:1].expand(ROWS)
    else:
        strided = torch.stack([scale, -scale], dim=1).reshape(-1)[::2]
    x = torch.randn(5, COLS, device=DEVICE)
    got = lorasc_linear(x, ScaledWeight(q, strided), None, lora_A, lora_B, 1.0, backend=backend)
    expected = lorasc_linear(x, ScaledWeight(q, scale), None, lora_A, lora_B, 1.0, backend=backend)
    assert torch.equal(got, expected)


# -- 3. scale values of the linear ------------------------------------------------------------


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_the_linear_refuses_scales_that_are_not_positive_and_finite(backend, scaled_dtype, bad):
    backend = scaled_backend(backend, scaled_dtype)
    q, scale, lora_B, lora_A = _scaled(scaled_dtype)
    scale[5] = bad
    x = torch.randn(3, COLS, device=DEVICE)
    refused(
        ValueError,
        "weight.scale must be positive and finite.*at row 5",
        lambda: lorasc_linear(
            x, ScaledWeight(q, scale), None, lora_A, lora_B, 1.0, backend=backend
        ),
        q,
        scale,
    )


def test_infinite_and_nan_codes_are_refused_by_the_merge(backend, scaled_dtype):
    """e5m2 has ±inf codes, both formats NaN codes: the merge refuses such a weight."""
    backend = scaled_backend(backend, scaled_dtype)
    q, scale, lora_B, lora_A = _scaled(scaled_dtype)
    every = torch.arange(256, dtype=torch.uint8)
    for code in every[~torch.isfinite(every.view(scaled_dtype).float())]:
        codes = q.clone()
        codes.view(torch.uint8)[2, 3] = code
        refused(
            ValueError,
            "weight has non-finite values",
            lambda codes=codes: merge_lowrank_(
                ScaledWeight(codes, scale), lora_B, lora_A, 0.5, backend=backend
            ),
            codes,
            scale,
        )


# -- 4. overlapping weights ------------------------------------------------------------------


def test_an_overlapping_weight_is_refused_by_every_backend(backend):
    buffer = torch.randn(4 + 8, device=DEVICE)
    weight = torch.as_strided(buffer, (4, 8), (1, 1))  # weight[i, j] is buffer[i + j]
    refused(
        ValueError,
        r"weight has overlapping elements \(shape \(4, 8\), strides \(1, 1\)\)",
        lambda: merge_lowrank_(
            weight,
            torch.randn(4, RANK, device=DEVICE),
            torch.randn(RANK, 8, device=DEVICE),
            0.5,
            backend=backend,
        ),
        buffer,
    )


def test_an_overlapping_scaled_weight_is_refused(backend, scaled_dtype):
    backend = scaled_backend(backend, scaled_dtype)
    q, scale, lora_B, lora_A = _scaled(scaled_dtype)
    codes = q.reshape(-1)[: ROWS + COLS].clone()
    weight = ScaledWeight(torch.as_strided(codes, (ROWS, COLS), (1, 1)), scale)
    refused(
        ValueError,
        "weight.codes has overlapping elements",
        lambda: merge_lowrank_(weight, lora_B, lora_A, 0.5, backend=backend),
        codes,
        scale,
    )


def test_codes_and_scale_aliasing_one_buffer_are_refused(backend, scaled_dtype):
    """Each is free of self-overlap, but the scale lies on the codes' first bytes: a merge
    would overwrite each with the other."""
    backend = scaled_backend(backend, scaled_dtype)
    q, scale, lora_B, lora_A = _scaled(scaled_dtype)
    codes = q.clone()
    aliased = codes.reshape(-1)[: 4 * ROWS].view(torch.float32)
    aliased.copy_(scale)  # valid scales, stored in the codes' memory
    weight = ScaledWeight(codes, aliased)
    refused(
        ValueError,
        "weight.codes and weight.scale share memory",
        lambda: merge_lowrank_(weight, lora_B, lora_A, 0.5, backend=backend),
        codes,
    )


def test_a_lora_factor_aliasing_the_weight_is_refused(backend):
    weight = torch.randn(ROWS, COLS, device=DEVICE)
    lora_B = weight[:, :RANK]  # B read while W is written
    refused(
        ValueError,
        "weight and lora_B share memory",
        lambda: merge_lowrank_(
            weight, lora_B, torch.randn(RANK, COLS, device=DEVICE), 0.5, backend=backend
        ),
        weight,
    )


# -- 5. float64 weights ----------------------------------------------------------------------


def test_a_float64_merge_computes_in_float64():
    weight = torch.randn(ROWS, COLS, dtype=torch.float64, device=DEVICE)
    lora_B = torch.randn(ROWS, RANK, dtype=torch.float64, device=DEVICE)
    lora_A = torch.randn(RANK, COLS, dtype=torch.float64, device=DEVICE)
    unchanged = weight.clone()
    merge_lowrank_(unchanged, lora_B, lora_A, 0.0, backend="torch")
    assert torch.equal(unchanged, weight)
    merged = weight.clone()
    merge_lowrank_(merged, lora_B, lora_A, 0.3, backend="torch")
    delta = lora_B[:, :1] * lora_A[:1] + lora_B[:, 1:] * lora_A[1:]
    assert torch.equal(merged, weight + 0.3 * delta)
    huge = weight.clone()  # beyond float32's range, within float64's
    merge_lowrank_(huge, lora_B, lora_A, 1e300, backend="torch")
    assert bool(torch.isfinite(huge).all())


# -- 7. Fp8Linear ----------------------------------------------------------------------------


def _fp8_linear():
    return Fp8Linear.from_linear(nn.Linear(COLS, ROWS))


def test_fp8_linear_refuses_an_input_of_the_wrong_width_or_dtype():
    layer = _fp8_linear()
    refused(
        ValueError,
        f"x must have in_features={COLS} as its last dim, got shape \\(3, 5\\)",
        lambda: layer(torch.randn(3, 5)),
        layer,
    )
    refused(
        TypeError,
        "x must be a tensor with a dtype in .*got torch.int64",
        lambda: layer(torch.ones(3, COLS, dtype=torch.int64)),
        layer,
    )


def test_fp8_linear_refuses_a_bias_of_the_wrong_shape_or_dtype_at_construction(scaled_dtype):
    weight = quantize(torch.randn(ROWS, COLS), scaled_dtype)
    with pytest.raises(ValueError, match=rf"bias must have shape \({ROWS},\)"):
        Fp8Linear(weight, torch.zeros(ROWS + 1))
    with pytest.raises(TypeError, match="bias must have a floating dtype"):
        Fp8Linear(weight, torch.zeros(ROWS, dtype=torch.int64))


def test_fp8_linear_refuses_bad_scale_values_at_construction(scaled_dtype):
    weight = quantize(torch.randn(ROWS, COLS), scaled_dtype)
    weight.scale[2] = 0.0
    with pytest.raises(ValueError, match="weight.scale must be positive and finite.*row 2"):
        Fp8Linear(weight)


def test_fp8_linear_from_a_layer_with_a_trained_lora_is_refused(scaled_dtype):
    layer = LoRASCLinear.from_linear(
        nn.Linear(COLS, ROWS), r=RANK, weight_format=scaled_weight_dtype(scaled_dtype).name
    )
    assert Fp8Linear.from_linear(layer).weight.data_ptr() == layer.weight.data_ptr()  # B = 0
    with torch.no_grad():
        layer.lora_B[1, 0] = 0.5
    refused(
        TypeError,
        "linear is a LoRASCLinear with a trained LoRA",
        lambda: Fp8Linear.from_linear(layer),
        layer,
    )


def test_a_layers_scales_are_checked_again_only_after_a_write(monkeypatch, scaled_dtype):
    """The scale check reads the device once; a layer's forward repeats it only when its
    scales changed since they last passed (an in-place write, a merge), so a forward does
    not wait on the GPU at every call, and a scale corrupted later is still refused."""
    from lorasc_kernels.formats import checks as _checks

    calls = []
    check = _checks.check_scale_values
    monkeypatch.setattr(_checks, "check_scale_values", lambda *a: calls.append(1) or check(*a))
    layer = LoRASCLinear(8, 6, r=2, weight_format=scaled_weight_dtype(scaled_dtype).name)
    x = torch.randn(3, 8)
    layer(x)
    layer(x)
    assert len(calls) == 1
    with torch.no_grad():
        layer.lora_B.normal_()
    merge_lowrank_(
        ScaledWeight(layer.weight.detach(), layer.weight_scale),
        layer.lora_B.detach(),
        layer.lora_A.detach(),
        1.0,
        backend="torch",
    )
    before = len(calls)
    layer(x)
    assert len(calls) == before + 1  # the merge wrote the scales
    layer.weight_scale[1] = -1.0
    with pytest.raises(ValueError, match="weight.scale must be positive and finite"):
        layer(x)


@pytest.mark.parametrize("weight_format", ["fp8_e5m2", "fp8_e4m3"])
def test_finalize_into_a_dtype_that_cannot_hold_the_merge_is_refused_by_name(weight_format):
    """An fp8 layer built from an fp16 linear near fp16's largest value takes a boundary
    update that fits fp8's float32-range scales; finalize() would dequantize it to fp16 as
    inf: refused naming the layer, nothing changed; with a wider dequantize_dtype it runs."""
    linear = nn.Linear(4, 3, bias=False).half()
    with torch.no_grad():
        linear.weight.fill_(60000.0)
    layer = LoRASCLinear.from_linear(linear, r=1, lora_alpha=1, weight_format=weight_format)
    model = nn.Sequential(layer)
    optimizer = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.0)
    cascade = Cascade(model, optimizer)
    with torch.no_grad():
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(20000.0)  # W + B A = 80000 > 65504, fp16's largest value
    err = refused(
        ValueError,
        r"layer '0': its merged fp8 weight exceeds the range of float16",
        cascade.finalize,
        model,
        cascade,
    )
    assert "dequantize_dtype" in str(err)
    with pytest.raises(ValueError, match="exceeds the range of float16"):
        cascade.merged_state_dict()
    layer.dequantize_dtype = torch.float32
    final = cascade.finalize()
    assert torch.isfinite(final[0].weight).all() and final[0].weight.dtype == torch.float32


@pytest.mark.parametrize("weight_format", ["fp8_e5m2", None])
def test_a_state_of_another_shape_loads_nothing_into_the_layer(weight_format):
    layer = LoRASCLinear(6, 5, r=2, weight_format=weight_format)
    other = LoRASCLinear(7, 5, r=2, weight_format=weight_format)  # same rows, other columns
    with torch.no_grad():
        other.bias.fill_(3.0)
        if weight_format is not None:
            other.weight_scale.mul_(2.0)
    before = {key: value.clone() for key, value in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"weight: the state's shape \(5, 7\) is not this layer's"):
        layer.load_state_dict(other.state_dict())
    for key, value in layer.state_dict().items():  # fp8 codes compared exactly in float32
        assert torch.equal(value.float(), before[key].float()), key


# -- scales, dequantization and prepared merges ------------------------------------------------


def test_a_scale_whose_largest_code_overflows_float32_is_refused_by_the_linear():
    codes = torch.full((2, 3), 57344.0).to(torch.float8_e5m2)  # e5m2's largest value
    weight = ScaledWeight(codes, torch.tensor([1.0, 1e35]))  # 57344 · 1e35 > float32's max
    with pytest.raises(ValueError, match=r"weight.scale .*at most .*at row 1"):
        lorasc_linear(torch.randn(4, 3), weight, None, torch.zeros(1, 3), torch.zeros(2, 1), 1.0)


def test_a_scale_that_requires_grad_is_refused_by_the_linear():
    q, scale, lora_B, lora_A = _scaled(torch.float8_e4m3fn)
    weight = ScaledWeight(q, scale.clone().requires_grad_(True))
    with pytest.raises(ValueError, match=r"weight.scale .* requires grad"):
        lorasc_linear(torch.randn(3, COLS), weight, None, lora_A, lora_B, 1.0, backend="torch")


def test_dequantize_to_an_integer_dtype_is_refused():
    q, scale, _, _ = _scaled(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        ScaledWeight(q, scale).dequantize(torch.int32)


def test_a_prepared_merge_runs_once():
    from lorasc_kernels.merge import prepare_merge

    weight = torch.randn(ROWS, COLS)
    merge = prepare_merge(weight, torch.randn(ROWS, RANK), torch.randn(RANK, COLS), 0.5)
    merge()
    once = weight.clone()
    with pytest.raises(RuntimeError, match="has run already"):
        merge()
    assert torch.equal(weight, once)
