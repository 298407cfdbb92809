"""The LoRASC linear (forward and backward) on every backend against the torch reference
and float64, then the Triton kernels' own paths (noise pass, noise in the GEMM, dropout
row splits).

Without a GPU, Triton runs on CPU tensors under ``TRITON_INTERPRET=1`` and CUDA through
its host build (tests/backend_params.py), with tiny shapes; the ``gpu`` tests repeat the checks
at real sizes on a CUDA device.
"""

import pytest
import torch

from lorasc_kernels import lorasc_linear
from lorasc_kernels import noise as noise_lib
from lorasc_kernels.backends import backend_module, composition, reference, resolve_backend
from lorasc_kernels.backends.specs import DropoutSpec, LinearSpec, NoiseSpec
from lorasc_kernels.backends.triton import fused_linear, thin
from tests.backend_params import DEVICE
from tests.helpers import KERNEL_TOLERANCE, lowrank_inputs, reference_float64, rel_error

NOISE_SEED = 2**64 - 7
DROPOUT_SEED = 2**63 + 3

# (dtype, M, K, N, r, dropout_p, noise_scale, bias): every dtype, r in {1, 5, 16, 64, 80},
# dropout and noise each on and off, not the full cross-product.
CASES = [
    (torch.float32, 37, 91, 53, 5, 0.0, 0.0, True),
    (torch.float16, 37, 91, 53, 1, 0.3, 0.0, True),
    (torch.bfloat16, 37, 91, 53, 16, 0.0, 0.05, False),
    (torch.float32, 13, 70, 66, 64, 0.2, 0.05, True),
    (torch.bfloat16, 19, 37, 23, 5, 0.25, 0.1, True),
    (torch.float16, 21, 40, 17, 16, 0.0, 0.1, False),
    (torch.float16, 9, 81, 85, 80, 0.1, 0.0, True),  # r > 64: several rank blocks
]


def _case_id(case):
    dtype, M, K, N, r, p, noise_scale, bias = case
    return f"{str(dtype)[6:]}-{M}x{K}x{N}-r{r}-p{p}-noise{noise_scale}{'-bias' if bias else ''}"


def _float64_run(x, weight, bias, lora_A, lora_B, scale, p, noise_scale, dy):
    """Output and gradients (x, bias, A, B) of the float64 oracle with the same mask/noise."""
    keep = None
    if p > 0.0:
        keep = reference.dropout_keep_mask(DROPOUT_SEED, x.shape[0], x.shape[1], p, x.device)
    noise = None
    if noise_scale > 0.0:
        noise = noise_scale * noise_lib.noise(NOISE_SEED, *weight.shape, device=x.device).double()
    leaves = [
        t.detach().double().requires_grad_(True) for t in (x, bias, lora_A, lora_B) if t is not None
    ]
    x64, *rest = leaves
    bias64 = rest.pop(0) if bias is not None else None
    y = reference_float64(x64, weight, bias64, *rest, scale, keep, p, noise)
    y.backward(dy.double())
    return y.detach(), [leaf.grad for leaf in leaves]


def _run(backend, x, weight, bias, lora_A, lora_B, scale, p, noise_scale, dy):
    """Output and gradients (x, bias, A, B) of ``lorasc_linear`` on ``backend``."""
    leaves = [t.detach().requires_grad_(True) for t in (x, bias, lora_A, lora_B) if t is not None]
    x_, *rest = leaves
    bias_ = rest.pop(0) if bias is not None else None
    y = lorasc_linear(
        x_,
        weight,
        bias_,
        *rest,
        scale,
        dropout_p=p,
        noise_seed=NOISE_SEED if noise_scale > 0.0 else None,
        noise_scale=noise_scale,
        backend=backend,
        dropout_seed=DROPOUT_SEED,
    )
    y.backward(dy)
    return y.detach(), [leaf.grad for leaf in leaves]


def _check_against_oracles(x, weight, bias, lora_A, lora_B, p, noise_scale, dy, backend="triton"):
    """``backend``'s output and grads within tolerance of float64 and of the torch reference."""
    scale = 1.75
    tolerance = KERNEL_TOLERANCE[x.dtype]
    weight_before = weight.clone()
    y, grads = _run(backend, x, weight, bias, lora_A, lora_B, scale, p, noise_scale, dy)
    assert torch.equal(weight, weight_before)  # fused noise never writes W
    y_ref, grads_ref = _run("torch", x, weight, bias, lora_A, lora_B, scale, p, noise_scale, dy)
    y64, grads64 = _float64_run(x, weight, bias, lora_A, lora_B, scale, p, noise_scale, dy)
    assert y.dtype == x.dtype and y.shape == y_ref.shape
    assert rel_error(y, y64) < tolerance
    assert rel_error(y, y_ref) < tolerance
    names = ["x", "bias", "lora_A", "lora_B"] if bias is not None else ["x", "lora_A", "lora_B"]
    for name, grad, grad_ref, grad64 in zip(names, grads, grads_ref, grads64, strict=True):
        assert grad.dtype == grad_ref.dtype, name
        assert rel_error(grad, grad64) < tolerance, name
        assert rel_error(grad, grad_ref) < tolerance, name


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_and_grads_match_reference_and_float64(backend, case):
    dtype, M, K, N, r, p, noise_scale, bias = case
    x, weight, b, lora_A, lora_B = lowrank_inputs(M, K, N, r, dtype, DEVICE, bias=bias)
    dy = torch.randn(M, N, device=DEVICE).to(dtype)
    _check_against_oracles(x, weight, b, lora_A, lora_B, p, noise_scale, dy, backend)


def test_strided_3d_x_and_fp32_lora_over_bf16_weight(backend):
    """x is a non-contiguous 3-D view; LoRA parameters are float32 over a bf16 weight."""
    x_base, weight, b, lora_A, lora_B = lowrank_inputs(
        2 * 9, 2 * 24, 20, 4, torch.bfloat16, DEVICE, lora_dtype=torch.float32
    )
    x = x_base.view(2, 9, 48)[:, :, 1::2]  # (2, 9, 24), strides (432, 48, 2)
    weight = weight[:, :24].contiguous()
    lora_A = lora_A[:, :24].contiguous()
    dy = torch.randn(2, 9, 20, device=DEVICE).to(torch.bfloat16)
    y, grads = _run(backend, x, weight, b, lora_A, lora_B, 2.0, 0.2, 0.05, dy)
    y64, grads64 = _float64_run(
        x.reshape(18, 24), weight, b, lora_A, lora_B, 2.0, 0.2, 0.05, dy.reshape(18, 20)
    )
    assert y.shape == (2, 9, 20)
    assert rel_error(y.reshape(18, 20), y64) < KERNEL_TOLERANCE[torch.bfloat16]
    assert [g.dtype for g in grads] == [torch.bfloat16] * 2 + [torch.float32] * 2
    for grad, grad64 in zip(grads, grads64, strict=True):
        assert rel_error(grad.reshape(grad64.shape), grad64) < KERNEL_TOLERANCE[torch.bfloat16]


def test_weight_and_bias_get_grads_only_when_they_require_them(backend):
    x, weight, b, lora_A, lora_B = lowrank_inputs(11, 19, 13, 3, torch.float32, DEVICE)
    weight.requires_grad_(True)
    lora_A.requires_grad_(True)
    dy = torch.randn(11, 13, device=DEVICE)
    lorasc_linear(
        x, weight, b, lora_A, lora_B, 2.0, noise_seed=NOISE_SEED, noise_scale=0.1, backend=backend
    ).backward(dy)
    assert b.grad is None and lora_B.grad is None and x.grad is None
    assert rel_error(weight.grad, dy.double().t() @ x.double()) < KERNEL_TOLERANCE[torch.float32]
    assert lora_A.grad is not None


def test_strided_x_in_the_kernel(backend):
    """The kernels read a column-strided 2-D x in place (no copy) and match a contiguous one."""
    x_base, weight, b, lora_A, lora_B = lowrank_inputs(17, 2 * 29, 19, 5, torch.float32, DEVICE)
    x = x_base[:, 1::2]
    lora_A = lora_A[:, :29].contiguous()
    weight = weight[:, :29].contiguous()
    spec = LinearSpec(1.5, dropout=DropoutSpec(5, 0.3))
    module = backend_module(backend)
    strided = composition.linear_forward(module, x, weight, b, lora_A, lora_B, spec)
    dense = composition.linear_forward(module, x.contiguous(), weight, b, lora_A, lora_B, spec)
    for got, expected in zip(strided, dense, strict=True):
        assert torch.equal(got, expected)


def test_strided_bias(backend):
    x, weight, b, lora_A, lora_B = lowrank_inputs(9, 16, 12, 2, torch.float32, DEVICE)
    strided_bias = torch.randn(24, device=DEVICE)[::2]
    got = lorasc_linear(x, weight, strided_bias, lora_A, lora_B, 1.5, backend=backend)
    expected = lorasc_linear(
        x, weight, strided_bias.contiguous(), lora_A, lora_B, 1.5, backend=backend
    )
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True], ids=["W", "W_t"])
def test_in_kernel_noise_is_bit_identical(dtype, transposed):
    weight = (torch.randn(37, 45, device=DEVICE) / 7).to(dtype)
    scale = 0.03
    got = fused_linear.noisy_weight_pass(weight, NoiseSpec(NOISE_SEED, scale), transposed)
    u = noise_lib.noise(NOISE_SEED, 37, 45, device=DEVICE)
    scale32 = float(torch.tensor(scale, dtype=torch.float32))
    expected = (weight.to(torch.float32) + scale32 * u).to(dtype)
    assert torch.equal(got, expected)
    assert torch.equal(got, reference.noisy_weight(weight, NOISE_SEED, scale))
    assert not torch.equal(got, weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noise_in_gemm_equals_separate_noise_pass(dtype, monkeypatch):
    """Both noise paths feed the GEMM the same noisy tiles, so y and dX are bit-identical
    with one tiling (the interpreter's); on a GPU each path may autotune another tiling."""
    x, weight, b, lora_A, lora_B = lowrank_inputs(20, 33, 18, 3, dtype, DEVICE)
    dy = torch.randn(20, 18, device=DEVICE).to(dtype)
    spec = LinearSpec(1.5, noise=NoiseSpec(NOISE_SEED, 0.1))
    needs = (True, False, False, False, False)
    triton_backend = resolve_backend("triton", torch.device(DEVICE))

    def run():
        y, xa = composition.linear_forward(triton_backend, x, weight, b, lora_A, lora_B, spec)
        dx = composition.linear_backward(
            triton_backend, dy, x, xa, weight, lora_A, lora_B, spec, needs
        )[0]
        return y, dx

    monkeypatch.setattr(fused_linear, "NOISE_IN_GEMM_MAX_ROWS", 1 << 30)
    in_gemm = run()
    monkeypatch.setattr(fused_linear, "NOISE_IN_GEMM_MAX_ROWS", 0)
    separate = run()
    for a, c in zip(in_gemm, separate, strict=True):
        if DEVICE == "cpu":
            assert torch.equal(a, c)
        assert rel_error(a, c) < KERNEL_TOLERANCE[dtype]


def test_dropout_grad_sums_row_splits():
    """dA's reduction over M runs in several row splits (M > 256) and still matches."""
    x = torch.randn(300, 16, device=DEVICE)
    g = torch.randn(300, 2, device=DEVICE)
    got = thin.dropout_lowrank_grad(g, x, DropoutSpec(9, 0.5))
    expected = g.double().t() @ reference.apply_dropout(x, 0.5, 9).double()
    assert rel_error(got, expected) < KERNEL_TOLERANCE[torch.float32]


# GPU checks are few: each new kernel specialization compiles every autotune config.
@pytest.mark.gpu
@pytest.mark.parametrize(
    "case",
    [
        (torch.bfloat16, 8192, 4096, 4096, 16, 0.1, 0.05, True),
        (torch.float32, 200, 1031, 517, 256, 0.05, 0.02, True),  # noise inside the GEMM
    ],
    ids=_case_id,
)
def test_gpu_real_sizes(case):
    dtype, M, K, N, r, p, noise_scale, bias = case
    x, weight, b, lora_A, lora_B = lowrank_inputs(M, K, N, r, dtype, "cuda", bias=bias)
    dy = torch.randn(M, N, device="cuda").to(dtype)
    _check_against_oracles(x, weight, b, lora_A, lora_B, p, noise_scale, dy)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_noise_bit_identical_at_real_size(dtype):
    weight = (torch.randn(4096, 4096, device="cuda") / 64).to(dtype)
    expected = reference.noisy_weight(weight, NOISE_SEED, 0.01)
    for transposed in (False, True):
        got = fused_linear.noisy_weight_pass(weight, NoiseSpec(NOISE_SEED, 0.01), transposed)
        assert torch.equal(got, expected)
