"""The CUDA backend's shared element-wise headers (csrc/lorasc/*.cuh), built for the host
with g++, against noise.py, rounding.py and the reference backend, bit for bit."""

import pytest
import torch

from lorasc_kernels import noise as noise_lib
from lorasc_kernels.backends import cuda, reference
from lorasc_kernels.backends.specs import DropoutSpec, MergeSpec, NoiseSpec
from lorasc_kernels.formats.rounding import round_from_fp32
from tests.backend_params import host_build

NO_NOISE_KEY = -1
TRANSFORM_NOISE, TRANSFORM_DROPOUT = cuda.TRANSFORM_NOISE, cuda.TRANSFORM_DROPOUT


@pytest.fixture(scope="module")
def host():
    return host_build()


def fresh_seed() -> int:
    return int(torch.randint(0, 2**62, ()))


def same_bits(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Bitwise equality of two float tensors of one dtype; any NaN equals any NaN (their
    payloads differ between conversion routines and carry no meaning)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    int_type = {4: torch.int32, 2: torch.int16}[actual.element_size()]
    nan = expected.isnan()
    return torch.equal(actual.isnan(), nan) and torch.equal(
        actual[~nan].view(int_type), expected[~nan].view(int_type)
    )


@pytest.mark.parametrize("row_offset", [0, 1000, 2**32 - 37])
def test_noise_bits_and_uniform_match_noise_py(host, row_offset):
    key = noise_lib.stream_key(fresh_seed(), noise_lib.STREAM_NOISE)
    bits = host.noise_bits(key, 37, 91, row_offset)
    expected = noise_lib.hash_bits(key, 37, 91, row_offset)
    assert torch.equal(bits, expected)
    assert same_bits(host.uniform(bits), noise_lib.uniform_from_bits(expected))


def rounding_inputs(count: int) -> torch.Tensor:
    """float32 values over many binades, with fp16 subnormals, overflow, ±0, ±inf and NaN."""
    magnitude = torch.exp2(torch.empty(count).uniform_(-30, 20))
    values = magnitude * torch.randn(count).sign()
    specials = torch.tensor(
        [
            0.0,
            -0.0,
            float("inf"),
            -float("inf"),
            float("nan"),
            65519.0,
            -70000.0,
            3.0e38,
            1e-8,
            -6.0e-5,
        ]
    )
    return torch.cat([values, specials])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_rounding_matches_rounding_py(host, dtype, rounding):
    values = rounding_inputs(4000)
    key = noise_lib.stream_key(fresh_seed(), noise_lib.STREAM_ROUNDING)
    bits = noise_lib.hash_bits(key, 1, values.numel()).view(-1)
    out = torch.empty(values.shape, dtype=dtype)
    host.round_from_fp32(values, bits, out, rounding == "stochastic")
    assert same_bits(out, round_from_fp32(values, dtype, rounding, bits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_noisy_weight_matches_reference(host, dtype):
    weight = torch.randn(53, 91).to(dtype)
    seed, scale = fresh_seed(), 0.37
    key = noise_lib.stream_key(seed, noise_lib.STREAM_NOISE)
    actual = host.transform(weight, TRANSFORM_NOISE, key, 0, scale)
    expected = reference.noisy_weight(weight, seed, scale)
    assert not torch.equal(expected, weight)
    assert same_bits(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_matches_reference(host, dtype, p):
    x = torch.randn(37, 91).to(dtype)
    seed = fresh_seed()
    key = noise_lib.stream_key(seed, noise_lib.STREAM_DROPOUT)
    actual = host.transform(
        x, TRANSFORM_DROPOUT, key, DropoutSpec(seed, p).threshold, 1.0 / (1.0 - p)
    )
    assert same_bits(actual, reference.apply_dropout(x, p, seed))


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("with_noise", [False, True])
@pytest.mark.parametrize(
    ("rows", "cols", "r", "strided"),
    [(29, 67, 5, False), (70, 296, 37, False), (33, 260, 17, True)],
)
def test_merge_kernel_emulated_matches_reference(
    host, weight_dtype, lora_dtype, rounding, with_noise, rows, cols, r, strided
):
    """The merge kernel's data path, CTA by CTA (row and column tails, several rank chunks,
    vector and element-wise weight access), bit for bit against the reference."""
    row_offset = 123
    storage = (torch.randn(rows, cols + 3) * 0.05).to(weight_dtype)
    weight = storage[:, 1 : 1 + cols] if strided else storage[:, :cols].contiguous()
    lora_B = (torch.randn(rows, r) * 0.01).to(lora_dtype)
    lora_A = (torch.randn(r, cols) * 0.01).to(lora_dtype)
    seed, coeff = fresh_seed(), 0.73
    remove = (fresh_seed(), 0.011) if with_noise else None
    add = (fresh_seed(), 0.013) if with_noise else None

    def key(pair):
        return NO_NOISE_KEY if pair is None else noise_lib.stream_key(pair[0], 0)

    expected = weight.clone()
    spec = MergeSpec(
        coeff,
        rounding,
        seed,
        None if remove is None else NoiseSpec(*remove),
        None if add is None else NoiseSpec(*add),
        row_offset,
    )
    reference.merge_(expected, lora_B, lora_A, spec)
    before = storage.clone()
    host.merge_lowrank_(
        weight,
        lora_B,
        lora_A,
        coeff,
        rounding == "stochastic",
        noise_lib.stream_key(seed, noise_lib.STREAM_ROUNDING),
        key(remove),
        remove[1] if remove else 0.0,
        key(add),
        add[1] if add else 0.0,
        row_offset,
    )
    assert not torch.equal(expected, before[:, 1 : 1 + cols] if strided else before[:, :cols])
    assert same_bits(weight, expected)
    if strided:  # the columns around the view are untouched
        assert torch.equal(storage[:, 0], before[:, 0])
        assert torch.equal(storage[:, -2:], before[:, -2:])


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("with_noise", [False, True])
def test_autograd_function_on_emulated_ops_matches_reference(monkeypatch, dropout_p, with_noise):
    """The CUDA backend's primitives on the host build's data paths, under the package's
    autograd, with a non-contiguous x and a column-major dY, against the torch backend."""
    from lorasc_kernels import ops as lorasc_ops
    from lorasc_kernels.backends.specs import LinearSpec
    from tests.backend_params import emulate_cuda_on_host
    from tests.helpers import lowrank_inputs, rel_error

    emulate_cuda_on_host(monkeypatch)
    M, K, N, r = 37, 91, 53, 5
    inputs = lowrank_inputs(M, K, N, r, torch.float32)
    spec = LinearSpec.of(
        0.7,
        dropout_p,
        fresh_seed(),
        fresh_seed() if with_noise else None,
        0.05 if with_noise else 0.0,
    )
    dy = torch.randn(M, N).t().contiguous().t()  # column-major, as autograd may hand it
    results = []
    for backend in ("cuda", "torch"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        x = torch.cat([leaves[0], leaves[0]], dim=1)[:, ::2]  # non-contiguous
        y = lorasc_ops.linear(x, *leaves[1:], spec, backend)
        y.backward(dy)
        results.append([y] + [t.grad for t in leaves])
    for name, actual, expected in zip(
        ("y", "x", "weight", "bias", "lora_A", "lora_B"), *results, strict=True
    ):
        assert rel_error(actual, expected) < 1e-5, name


def no_transform():
    return (0, 0, 0, 0.0, False)


def gemm_case(case: str, dtype: torch.dtype):
    """Arguments of lowrank_gemm for one use in the CUDA backend, and the float64 result.

    Shapes leave tails in every tile dimension; the operands cover the three load layouts
    (vectors along the depth, along the rows, element by element)."""
    from tests.helpers import lowrank_inputs

    noise_seed, drop_seed, p, scale = fresh_seed(), fresh_seed(), 0.3, 0.7
    noise = (TRANSFORM_NOISE, noise_lib.stream_key(noise_seed, noise_lib.STREAM_NOISE), 0, 0.1)
    drop = (
        TRANSFORM_DROPOUT,
        noise_lib.stream_key(drop_seed, noise_lib.STREAM_DROPOUT),
        DropoutSpec(drop_seed, p).threshold,
        1.0 / (1.0 - p),
    )
    K = 91 if case == "forward_odd" else 136
    r = 40 if case == "forward_odd" else 16
    x, weight, bias, lora_A, lora_B = lowrank_inputs(130, K, 150, r, dtype)
    if case in ("forward", "forward_odd"):  # y = x (W + n)ᵀ + b + s xa Bᵀ
        xa = x @ lora_A.t()
        args = (x, weight, bias, xa, lora_B, scale, *no_transform(), *noise, False)
        noisy = reference.noisy_weight(weight, noise_seed, 0.1).double()
        expected = (
            x.double() @ noisy.t() + bias.double() + scale * (xa.double() @ lora_B.double().t())
        )
    elif case == "backward":  # dX = dY (W + n) + dY_B A, with Q = Wᵀ and V = Aᵀ
        dy, dy_b = torch.randn(130, 150).to(dtype), torch.randn(130, r).to(dtype)
        args = (dy, weight.t(), None, dy_b, lora_A.t(), 1.0, *no_transform(), *noise, True)
        noisy = reference.noisy_weight(weight, noise_seed, 0.1).double()
        expected = dy.double() @ noisy + dy_b.double() @ lora_A.double()
    elif case == "dropout_left":  # xa = drop(x) Aᵀ
        args = (x, lora_A, None, None, None, 1.0, *drop, False, *no_transform())
        expected = reference.apply_dropout(x, p, drop_seed).double() @ lora_A.double().t()
    else:  # "dropout_right_swapped": dA = dY_Bᵀ drop(x), with P = dY_Bᵀ and Q = xᵀ
        dy_b = torch.randn(130, r).to(dtype)
        args = (dy_b.t(), x.t(), None, None, None, 1.0, *no_transform(), *drop, True)
        expected = dy_b.double().t() @ reference.apply_dropout(x, p, drop_seed).double()
    return args, expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "case", ["forward", "forward_odd", "backward", "dropout_left", "dropout_right_swapped"]
)
def test_gemm_data_path_emulated_on_host(host, dtype, case):
    from tests.helpers import TOLERANCE, rel_error

    args, expected = gemm_case(case, dtype)
    out = host.emulate_lowrank_gemm(*args)
    assert out.dtype == dtype and out.shape == expected.shape
    assert rel_error(out, expected) < TOLERANCE[dtype]
