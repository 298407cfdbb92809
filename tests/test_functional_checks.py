"""Every bad input of lorasc_linear raises a clear error; backend resolution."""

import pytest
import torch

from lorasc_kernels import lorasc_linear, merge_lowrank_
from lorasc_kernels.backends import reference, resolve_backend
from tests.helpers import lowrank_inputs

M, K, N, R = 6, 10, 8, 3


def _call(**overrides):
    x, weight, bias, lora_A, lora_B = lowrank_inputs(M, K, N, R, torch.float32)
    arguments = {
        "x": x,
        "weight": weight,
        "bias": bias,
        "lora_A": lora_A,
        "lora_B": lora_B,
        "scale": 2.0,
    }
    arguments.update(overrides)
    return lorasc_linear(**arguments)


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        ({"x": torch.randn(M, K + 1)}, ValueError, "x must have in_features=10"),
        ({"x": torch.randn(())}, ValueError, "x must have"),
        ({"weight": torch.randn(N, K, 1)}, ValueError, "weight must be 2-D"),
        ({"bias": torch.randn(N + 1)}, ValueError, r"bias must have shape \(8,\)"),
        ({"lora_A": torch.randn(R, K + 2)}, ValueError, "lora_A must have shape"),
        ({"lora_B": torch.randn(N, R + 1)}, ValueError, "lora_B must have shape"),
        ({"lora_B": torch.randn(N + 1, R)}, ValueError, "lora_B must have shape"),
        (
            {"lora_A": torch.randn(K + 1, K), "lora_B": torch.randn(N, K + 1)},
            ValueError,
            "1 <= r <= min",
        ),
        ({"x": torch.randint(0, 3, (M, K))}, TypeError, "x must have a floating dtype"),
        ({"weight": torch.ones(N, K, dtype=torch.int8)}, TypeError, "weight must have"),
        ({"x": [[1.0] * K]}, TypeError, "x must be a torch.Tensor"),
        ({"x": torch.randn(M, K).bfloat16()}, TypeError, "x has dtype torch.bfloat16"),
        ({"bias": torch.randn(N).half()}, TypeError, "bias must have weight's dtype"),
        ({"scale": float("nan")}, ValueError, "scale must be finite"),
        ({"scale": float("inf")}, ValueError, "scale must be finite"),
        ({"scale": "2"}, TypeError, "scale must be a float"),
        ({"dropout_p": 1.0}, ValueError, r"dropout_p must be in \[0, 1\)"),
        ({"dropout_p": -0.2}, ValueError, "dropout_p"),
        ({"noise_scale": 0.1}, ValueError, "noise_seed is None"),
        ({"noise_seed": 1, "noise_scale": -1.0}, ValueError, "noise_scale must be >= 0"),
        ({"noise_seed": -3, "noise_scale": 1.0}, ValueError, "noise_seed must be >= 0"),
        ({"noise_seed": 1.5, "noise_scale": 1.0}, TypeError, "noise_seed must be an int"),
        ({"dropout_seed": 2**64}, ValueError, "dropout_seed"),
        ({"backend": "tpu"}, ValueError, "backend must be one of"),
        ({"backend": 3}, TypeError, "backend must be a str"),
        ({"lora_A": torch.randn(R, K, device="meta")}, ValueError, "all tensors must be on"),
    ],
)
def test_bad_inputs(overrides, error, match):
    """Refused whether or not a good call warmed the cache of passed checks first."""
    with pytest.raises(error, match=match):
        _call(**overrides)
    _call()
    with pytest.raises(error, match=match):
        _call(**overrides)


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        ({"scale": True}, TypeError, "scale must be a float"),  # True == 1.0, and hashes alike
        ({"dropout_p": [0.0]}, TypeError, "dropout_p must be a float"),  # unhashable
        ({"backend": ["torch"]}, TypeError, "backend must be a str"),
        ({"noise_seed": True}, TypeError, "noise_seed must be an int"),  # True == 1
    ],
)
def test_a_passed_call_does_not_pass_an_equal_looking_one(overrides, error, match):
    """The cache of passed checks keys a call by its arguments' types too (``True == 1.0``),
    and an unhashable argument reaches the check that refuses it."""
    known = {"scale": 1.0, "dropout_p": 0.0, "backend": "torch", "noise_scale": 0.5}
    _call(**known, noise_seed=1)
    with pytest.raises(error, match=match):
        _call(**{**known, "noise_seed": 1, **overrides})


def test_a_passed_call_with_another_noise_seed_uses_that_seed():
    """The spec kept with a passed call's checks is that call's: a new noise seed (once per
    cascade) gives the output of that seed, as a first call with it does."""
    x, weight, bias, lora_A, lora_B = lowrank_inputs(M, K, N, R, torch.float32)

    def output(seed):
        return lorasc_linear(x, weight, bias, lora_A, lora_B, 2.0, noise_seed=seed, noise_scale=0.1)

    first, second = output(5), output(6)
    assert not torch.equal(first, second)
    torch.testing.assert_close(output(5), first, rtol=0, atol=0)
    torch.testing.assert_close(output(6), second, rtol=0, atol=0)
    noisy = reference.noisy_weight(weight, 6, 0.1).double()
    x64 = x.double()
    expected = (
        x64 @ noisy.t() + bias.double() + 2.0 * (x64 @ lora_A.double().t()) @ lora_B.double().t()
    )
    torch.testing.assert_close(second.double(), expected, rtol=1e-5, atol=1e-5)


def test_a_scaled_weight_is_checked_again_when_its_parts_change():
    """Same shapes and dtypes as a passed call: codes that now require grad are refused, and
    scales written since (a new version) are checked again."""
    from lorasc_kernels import ScaledWeight
    from lorasc_kernels.formats.quantize import quantize

    x, weight, _, lora_A, lora_B = lowrank_inputs(M, K, N, R, torch.float32)
    scaled, bias = quantize(weight, torch.float8_e4m3fn), None
    lorasc_linear(x, scaled, bias, lora_A, lora_B, 1.0, backend="torch")
    trainable = ScaledWeight(scaled.codes, scaled.scale.clone().requires_grad_())
    with pytest.raises(ValueError, match=r"weight.scale .* requires grad"):
        lorasc_linear(x, trainable, bias, lora_A, lora_B, 1.0, backend="torch")
    scaled.scale[3] = 0.0
    with pytest.raises(ValueError, match="weight.scale must be positive and finite.* at row 3"):
        lorasc_linear(x, scaled, bias, lora_A, lora_B, 1.0, backend="torch")


def test_unavailable_backend_names_what_is_missing():
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        _call(backend="cuda")
    with pytest.raises(RuntimeError, match="backend='triton' is not available on meta"):
        resolve_backend("triton", torch.device("meta"))


def test_auto_falls_back_to_torch_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) is reference
    assert resolve_backend("torch", torch.device("cpu")) is reference


def test_float64_only_on_torch_backend():
    x, weight, bias, lora_A, lora_B = lowrank_inputs(M, K, N, R, torch.float64)
    assert lorasc_linear(x, weight, bias, lora_A, lora_B, 1.0, backend="torch").dtype == (
        torch.float64
    )


def test_merge_accepts_a_row_block_with_fewer_rows_than_rank():
    weight = torch.randn(20, K)
    lora_B, lora_A = torch.randn(20, 4), torch.randn(4, K)
    whole = weight.clone()
    merge_lowrank_(whole, lora_B, lora_A, 0.5, rounding="nearest", backend="torch")
    for start in range(0, 20, 2):  # 2-row shards, r = 4
        block = weight[start : start + 2]
        merge_lowrank_(
            block,
            lora_B[start : start + 2],
            lora_A,
            0.5,
            rounding="nearest",
            row_offset=start,
            backend="torch",
        )
    assert torch.equal(weight, whole)
    with pytest.raises(ValueError, match="r <= in_features"):
        merge_lowrank_(weight, torch.randn(20, K + 1), torch.randn(K + 1, K), 0.5)


def test_output_is_not_a_view():
    x, weight, bias, lora_A, lora_B = lowrank_inputs(M, K, N, R, torch.float32)
    y = lorasc_linear(x.reshape(2, 3, K), weight, bias, lora_A, lora_B, 1.0)
    assert y.shape == (2, 3, N) and not y._is_view()


def test_merge_refuses_a_weight_with_overlapping_elements():
    weight = torch.zeros(1, K).expand(4, K)
    with pytest.raises(ValueError, match="weight has overlapping elements"):
        merge_lowrank_(weight, torch.randn(4, 2), torch.randn(2, K), 0.5, backend="torch")


def test_autocast_leaves_float64_alone():
    x, weight, bias, lora_A, lora_B = lowrank_inputs(M, K, N, R, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lorasc_linear(x, weight, bias, lora_A, lora_B, 1.0, backend="torch")
    assert y.dtype == torch.float64


def test_second_order_gradients_match_plain_torch():
    inputs = [t.double().requires_grad_(True) for t in lowrank_inputs(M, K, N, R, torch.float32)]

    def plain(x, weight, bias, lora_A, lora_B):
        return x @ weight.t() + bias + 1.5 * (x @ lora_A.t()) @ lora_B.t()

    expected, actual = [], []
    for grads, linear in (
        (expected, plain),
        (actual, lambda *t: lorasc_linear(*t, 1.5, backend="torch")),
    ):
        (grad,) = torch.autograd.grad(linear(*inputs).square().sum(), inputs[3], create_graph=True)
        grads.extend(torch.autograd.grad(grad.square().sum(), inputs))
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e)
