"""The CUDA backend on a GPU: forward/backward against float64 in every dtype and odd
shapes, the merge and every random draw bit for bit against the reference and Triton."""

import os

import pytest
import torch

from lorasc_kernels import functional, merge
from lorasc_kernels import noise as noise_lib
from lorasc_kernels.backends import reference
from lorasc_kernels.backends.specs import DropoutSpec, NoiseSpec
from tests.helpers import DTYPES, TOLERANCE, lowrank_inputs, reference_float64, rel_error

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
# (M, K, N, r): odd tails, a single row, rank 1, rank 256.
SHAPES = [(37, 91, 53, 5), (1, 8, 8, 1), (130, 257, 129, 17), (70, 300, 280, 256)]


@pytest.fixture(scope="module")
def cuda_ops():
    from lorasc_kernels.backends import cuda

    reason = cuda.unavailable_reason(DEVICE)
    prebuilt = os.environ.get("LORASC_CUDA_EXTENSION")
    if reason is not None and prebuilt and not os.path.isfile(prebuilt):
        pytest.skip(reason)  # the GPU check's build step failed, and says so; no rebuild
    assert reason is None, reason
    return cuda.extension_ops(DEVICE)


@pytest.fixture(autouse=True)
def _full_fp32_matmul():
    """cuBLAS's fp32 thin products in full fp32 (no tf32), whatever other tests set."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def fresh_seed() -> int:
    return int(torch.randint(0, 2**62, ()))


def same_bits(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    int_type = {4: torch.int32, 2: torch.int16}[actual.element_size()]
    return actual.dtype == expected.dtype and torch.equal(
        actual.contiguous().view(int_type), expected.contiguous().view(int_type)
    )


def triton_or_skip():
    from lorasc_kernels.backends import resolve_backend

    try:
        return resolve_backend("triton", DEVICE)
    except RuntimeError as error:
        pytest.skip(str(error))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_float64(cuda_ops, dtype, shape, bias):
    M, K, N, r = shape
    x, weight, b, lora_A, lora_B = lowrank_inputs(M, K, N, r, dtype, DEVICE, bias=bias)
    if bias:
        b = torch.stack([b, b], dim=1)[:, 0]  # a strided view
    y = functional.lorasc_linear(x, weight, b, lora_A, lora_B, 1.7, backend="cuda")
    expected = reference_float64(x, weight, b, lora_A, lora_B, 1.7)
    assert y.dtype == dtype and y.shape == (M, N)
    assert rel_error(y, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_forward_backward_with_noise_dropout_and_strides(cuda_ops, dtype, shape):
    M, K, N, r = shape
    x, weight, b, lora_A, lora_B = lowrank_inputs(
        M, K, N, r, dtype, DEVICE, lora_dtype=torch.float32
    )
    x = torch.cat([x, x], dim=1)[:, ::2].detach()  # non-contiguous input
    p, dropout_seed, noise_seed, noise_scale, scale = 0.3, fresh_seed(), fresh_seed(), 0.05, 0.8
    leaves = [t.clone().requires_grad_() for t in (x, b, lora_A, lora_B)]
    y = functional.lorasc_linear(
        leaves[0],
        weight,
        leaves[1],
        leaves[2],
        leaves[3],
        scale,
        dropout_p=p,
        noise_seed=noise_seed,
        noise_scale=noise_scale,
        backend="cuda",
        dropout_seed=dropout_seed,
    )
    dy = torch.randn(M, N, device=DEVICE).to(dtype).t().contiguous().t()  # column-major
    y.backward(dy)

    noisy = reference.noisy_weight(weight, noise_seed, noise_scale)
    keep = reference.dropout_keep_mask(dropout_seed, M, K, p, device=DEVICE)
    leaves64 = [t.double().requires_grad_() for t in (x, b, lora_A, lora_B)]
    y64 = reference_float64(
        leaves64[0],
        weight,
        leaves64[1],
        leaves64[2],
        leaves64[3],
        scale,
        keep=keep,
        p=p,
        noise=noisy.double() - weight.double(),
    )
    y64.backward(dy.double())
    tolerance = TOLERANCE[dtype]
    assert rel_error(y, y64) < tolerance
    for name, leaf, leaf64 in zip(("x", "bias", "lora_A", "lora_B"), leaves, leaves64, strict=True):
        assert leaf.grad.dtype == leaf.dtype, name
        assert rel_error(leaf.grad, leaf64.grad) < tolerance, name


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_reference_backend(cuda_ops, dtype):
    M, K, N, r = SHAPES[2]
    inputs = lowrank_inputs(M, K, N, r, dtype, DEVICE)
    grads = {}
    for backend in ("cuda", "torch"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y = functional.lorasc_linear(*leaves, 2.0, noise_seed=11, noise_scale=0.02, backend=backend)
        y.backward(torch.ones_like(y))
        grads[backend] = [t.grad for t in leaves]
    for actual, expected in zip(grads["cuda"], grads["torch"], strict=True):
        assert rel_error(actual, expected) < 2 * TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_fused_noise_equals_reference_and_triton_bits(cuda_ops, dtype, transposed):
    """The GEMM's noise on load, read out exactly through an identity: I·(W + n)ᵀ."""
    N, K = 67, 300
    weight = torch.randn(N, K, device=DEVICE).to(dtype)
    seed, scale = fresh_seed(), 0.3
    key = noise_lib.stream_key(seed, noise_lib.STREAM_NOISE)
    if transposed:  # backward's read: Q = Wᵀ, indices swapped; out = I · W
        eye = torch.eye(N, device=DEVICE, dtype=dtype)
        out = cuda_ops.lowrank_gemm(
            eye, weight.t(), None, None, None, 1.0, 0, 0, 0, 0.0, False, 1, key, 0, scale, True
        )
    else:  # forward's read: Q = W; out = I · Wᵀ
        eye = torch.eye(K, device=DEVICE, dtype=dtype)
        out = cuda_ops.lowrank_gemm(
            eye, weight, None, None, None, 1.0, 0, 0, 0, 0.0, False, 1, key, 0, scale, False
        ).t()
    expected = reference.noisy_weight(weight, seed, scale)
    assert not torch.equal(expected, weight)
    assert same_bits(out, expected)
    triton_or_skip()
    from lorasc_kernels.backends.triton import fused_linear

    assert same_bits(
        out, fused_linear.noisy_weight_pass(weight, NoiseSpec(seed, scale), transposed)
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_kernel_equals_reference_bits(cuda_ops, dtype):
    x = torch.randn(37, 300, device=DEVICE).to(dtype)
    p, seed = 0.4, fresh_seed()
    key = noise_lib.stream_key(seed, noise_lib.STREAM_DROPOUT)
    out = cuda_ops.dropout(x, key, DropoutSpec(seed, p).threshold, 1.0 / (1.0 - p))
    assert same_bits(out, reference.apply_dropout(x, p, seed))


@pytest.mark.parametrize("weight_dtype", DTYPES)
@pytest.mark.parametrize("lora_dtype", DTYPES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_merge_bit_equal_to_reference(cuda_ops, weight_dtype, lora_dtype, rounding):
    rows, cols, r, row_offset = 67, 300, 17, 1000
    weight = (torch.randn(rows, cols, device=DEVICE) * 0.05).to(weight_dtype)
    lora_B = (torch.randn(rows, r, device=DEVICE) * 0.01).to(lora_dtype)
    lora_A = (torch.randn(r, cols, device=DEVICE) * 0.01).to(lora_dtype)
    kwargs = dict(
        coeff=0.37,
        rounding=rounding,
        seed=fresh_seed(),
        noise_remove=(fresh_seed(), 0.01),
        noise_add=(fresh_seed(), 0.02),
        row_offset=row_offset,
    )
    actual = merge.merge_lowrank_(weight.clone(), lora_B, lora_A, backend="cuda", **kwargs)
    expected = merge.merge_lowrank_(weight.clone(), lora_B, lora_A, backend="torch", **kwargs)
    assert not torch.equal(expected, weight)
    assert same_bits(actual, expected)


@pytest.mark.parametrize("weight_dtype", DTYPES)
def test_merge_rank_256_strided_and_equal_to_triton(cuda_ops, weight_dtype):
    rows, cols, r = 300, 260, 256
    storage = (torch.randn(rows, cols + 9, device=DEVICE) * 0.05).to(weight_dtype)
    weight = storage[:, 3 : 3 + cols]  # rows not 16-byte aligned: the element-wise path
    lora_B = torch.randn(rows, r, device=DEVICE) * 0.01
    lora_A = torch.randn(r, cols, device=DEVICE) * 0.01
    kwargs = dict(coeff=0.5, seed=fresh_seed(), noise_add=(fresh_seed(), 0.02))
    expected = merge.merge_lowrank_(weight.clone(), lora_B, lora_A, backend="torch", **kwargs)
    before = storage.clone()
    merge.merge_lowrank_(weight, lora_B, lora_A, backend="cuda", **kwargs)
    assert same_bits(weight, expected)
    assert torch.equal(storage[:, :3], before[:, :3]) and torch.equal(
        storage[:, -6:], before[:, -6:]
    )
    triton_or_skip()
    by_triton = merge.merge_lowrank_(
        before[:, 3 : 3 + cols].clone(), lora_B, lora_A, backend="triton", **kwargs
    )
    assert same_bits(weight, by_triton)


def test_opcheck(cuda_ops):
    x = torch.randn(37, 91, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.randn(53, 91, device=DEVICE, dtype=torch.bfloat16)
    u = torch.randn(37, 5, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn(53, 5, device=DEVICE, dtype=torch.bfloat16)
    torch.library.opcheck(
        cuda_ops.lowrank_gemm.default,
        (x, weight, None, u, v, 2.0, 2, 5, 1000, 1.5, False, 1, 7, 0, 0.1, False),
    )
    torch.library.opcheck(cuda_ops.dropout.default, (x, 5, 1000, 1.5))
    lora_B = torch.randn(53, 5, device=DEVICE)
    lora_A = torch.randn(5, 91, device=DEVICE)
    torch.library.opcheck(
        cuda_ops.merge_lowrank_.default,
        (weight.clone(), lora_B, lora_A, 0.5, True, 3, -1, 0.0, 9, 0.01, 0),
    )


# The CUTLASS sm90a kernels (csrc/lorasc/cutlass_problem.h): K and N multiples of 8.
# (M, K, N, r): M past one 128-row tile and not a multiple of it, N past one 256-column
# tile, a single row, rank 1 and 64.
CUTLASS_SHAPES = [(133, 72, 40, 5), (1, 8, 8, 1), (300, 264, 520, 16), (257, 1024, 264, 64)]
ROUTE_WMMA, ROUTE_K_MAJOR, ROUTE_N_MAJOR = 0, 1, 2
HALF_TYPES = (torch.float16, torch.bfloat16)


def cutlass_here() -> bool:
    """Whether this GPU runs the CUTLASS kernels: compute capability 9.0 and an sm_90a build
    with the CUTLASS headers."""
    from lorasc_kernels import _build

    return (
        torch.cuda.get_device_capability(DEVICE) == (9, 0)
        and _build.cutlass_include() is not None
        and "9.0a" in _build._arch_list(DEVICE)
    )


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_cutlass_route_on_this_gpu(cuda_ops, dtype):
    x, weight, *_ = lowrank_inputs(133, 72, 40, 5, dtype, DEVICE)
    dy = torch.randn(133, 40, device=DEVICE, dtype=dtype)
    on = cutlass_here()
    assert cuda_ops.lowrank_gemm_route(x, weight, 0, 0) == (ROUTE_K_MAJOR if on else ROUTE_WMMA)
    assert cuda_ops.lowrank_gemm_route(dy, weight.t(), 0, 0) == (
        ROUTE_N_MAJOR if on else ROUTE_WMMA
    )
    # The fused noise and dropout stay on the WMMA kernel, so their bits are unchanged.
    assert cuda_ops.lowrank_gemm_route(x, weight, 0, 1) == ROUTE_WMMA
    assert cuda_ops.lowrank_gemm_route(x, weight, 2, 0) == ROUTE_WMMA
    assert cuda_ops.lowrank_gemm_route(x.float(), weight.float(), 0, 0) == ROUTE_WMMA


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("shape", CUTLASS_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_cutlass_forward_and_dx_match_float64(cuda_ops, dtype, shape, bias):
    M, K, N, r = shape
    x, weight, b, lora_A, lora_B = lowrank_inputs(M, K, N, r, dtype, DEVICE, bias=bias)
    leaves = [x.clone().requires_grad_(), lora_A, lora_B]
    y = functional.lorasc_linear(leaves[0], weight, b, leaves[1], leaves[2], 1.7, backend="cuda")
    dy = torch.randn(M, N, device=DEVICE).to(dtype)
    y.backward(dy)
    x64 = x.double().requires_grad_()
    y64 = reference_float64(x64, weight, b, lora_A, lora_B, 1.7)
    y64.backward(dy.double())
    assert rel_error(y, y64) < TOLERANCE[dtype]
    assert rel_error(leaves[0].grad, x64.grad) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_cutlass_equals_wmma_within_tolerance(cuda_ops, dtype, transposed, monkeypatch):
    M, K, N, r = CUTLASS_SHAPES[2]
    p = torch.randn(M, K, device=DEVICE, dtype=dtype)
    if transposed:  # dX's q = Wᵀ, a view
        q = torch.randn(K, N, device=DEVICE, dtype=dtype).t()
    else:
        q = torch.randn(N, K, device=DEVICE, dtype=dtype)
    b = torch.randn(N, device=DEVICE, dtype=dtype)
    u = torch.randn(M, r, device=DEVICE, dtype=dtype)
    v = torch.randn(N, r, device=DEVICE, dtype=dtype)
    args = (p, q, b, u, v, 0.6, 0, 0, 0, 0.0, False, 0, 0, 0, 0.0, False)
    by_route = cuda_ops.lowrank_gemm(*args)
    monkeypatch.setenv("LORASC_CUDA_GEMM", "wmma")
    assert cuda_ops.lowrank_gemm_route(p, q, 0, 0) == ROUTE_WMMA
    by_wmma = cuda_ops.lowrank_gemm(*args)
    expected = p.double() @ q.double().t() + b.double() + 0.6 * (u.double() @ v.double().t())
    assert rel_error(by_route, expected) < TOLERANCE[dtype]
    assert rel_error(by_route, by_wmma) < TOLERANCE[dtype]


def test_cutlass_rounds_once_to_nearest(cuda_ops):
    """Small integers: every product and sum is exact in fp32, so the output is the float64
    result rounded once to bf16, bit for bit, on either kernel."""
    M, K, N, r = 300, 264, 520, 3

    def integers(*shape):
        return torch.randint(-8, 9, shape, device=DEVICE).to(torch.bfloat16)

    p, q, b, u, v = integers(M, K), integers(N, K), integers(N), integers(M, r), integers(N, r)
    out = cuda_ops.lowrank_gemm(p, q, b, u, v, 0.5, 0, 0, 0, 0.0, False, 0, 0, 0, 0.0, False)
    exact = p.double() @ q.double().t() + b.double() + 0.5 * (u.double() @ v.double().t())
    assert same_bits(out, exact.to(torch.bfloat16))


def test_opcheck_cutlass_shapes(cuda_ops):
    x = torch.randn(133, 72, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.randn(40, 72, device=DEVICE, dtype=torch.bfloat16)
    u = torch.randn(133, 5, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn(40, 5, device=DEVICE, dtype=torch.bfloat16)
    bias = torch.randn(40, device=DEVICE, dtype=torch.bfloat16)
    torch.library.opcheck(
        cuda_ops.lowrank_gemm.default,
        (x, weight, bias, u, v, 2.0, 0, 0, 0, 0.0, False, 0, 0, 0, 0.0, False),
    )
