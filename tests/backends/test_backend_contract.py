"""Conformance of every registered backend to the contract (lorasc_kernels/backends/contract.py).

Each backend implements the :class:`Backend` Protocol with the Protocol's signatures and
declares dtypes of the registry; its primitives reproduce the reference's noise and
dropout bits. The op tests run on every backend too, through the same ``backend`` fixture
(tests/backend_params.py): the merge in tests/test_merge.py, the linear's forward and backward
in tests/test_linear.py. Without a GPU the CUDA backend runs through the host
build of its kernels' data paths; its compiled kernels are checked by the ``gpu`` tests.
"""

import inspect

import pytest
import torch

from lorasc_kernels.backends import BACKENDS, backend_module, reference
from lorasc_kernels.backends.contract import PRIMITIVES, Backend
from lorasc_kernels.backends.specs import DropoutSpec, NoiseSpec
from lorasc_kernels.formats.registry import KERNEL_DTYPES, REFERENCE_DTYPES
from tests.backend_params import DEVICE, REGISTERED
from tests.helpers import KERNEL_TOLERANCE, rel_error


def _module_or_skip(name: str):
    try:
        return backend_module(name)
    except ImportError as error:
        pytest.skip(f"backend {name!r} cannot be imported here: {error}")


def test_the_names_callers_pass_are_auto_and_the_registered_backends():
    assert BACKENDS == ("auto", *REGISTERED)
    assert "torch" in REGISTERED  # the oracle


@pytest.mark.parametrize("name", REGISTERED)
def test_implements_every_primitive_with_the_protocols_signature(name):
    module = _module_or_skip(name)
    assert isinstance(module, Backend)
    for primitive in PRIMITIVES:
        expected = list(inspect.signature(getattr(Backend, primitive)).parameters)[1:]  # self
        actual = list(inspect.signature(getattr(module, primitive)).parameters)
        assert actual == expected, f"{name}.{primitive}"


@pytest.mark.parametrize("name", REGISTERED)
def test_declares_dtypes_of_the_registry(name):
    dtypes = _module_or_skip(name).WEIGHT_DTYPES
    assert dtypes and set(dtypes) <= set(REFERENCE_DTYPES)
    assert set(KERNEL_DTYPES) <= set(dtypes)  # every backend takes the kernel dtypes


def test_a_missing_primitive_fails_the_protocol():
    class Incomplete:
        WEIGHT_DTYPES = KERNEL_DTYPES
        unavailable_reason = lowrank_gemm = dropout_lowrank = dropout_lowrank_grad = print

    assert not isinstance(Incomplete(), Backend)  # no merge_


def _same(got: torch.Tensor, expected: torch.Tensor):
    """Bit for bit, except fp32 on a GPU, whose 3×tf32 dots are within ~1e-6."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if DEVICE == "cpu" or got.dtype != torch.float32:
        assert torch.equal(got, expected)
    else:
        assert torch.allclose(got, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("q_transposed", [False, True], ids=["W", "W_t"])
def test_lowrank_gemm_adds_the_references_noise(backend, dtype, q_transposed):
    """An identity P makes the GEMM return the noisy weight itself, in either orientation."""
    weight = (torch.randn(37, 45, device=DEVICE) / 7).to(dtype)
    noise = NoiseSpec(2**64 - 5, 0.03)
    expected = reference.noisy_weight(weight, noise.seed, noise.scale)
    module = backend_module(backend)
    if q_transposed:  # P (37, 37) · (W ⊕ n), W passed as stored = W ⊕ n
        eye = torch.eye(37, device=DEVICE, dtype=dtype)
        got = module.lowrank_gemm(
            eye, weight, None, None, None, 1.0, noise=noise, q_transposed=True
        )
    else:  # P (45, 45) · (W ⊕ n)ᵀ = (W ⊕ n)ᵀ
        eye = torch.eye(45, device=DEVICE, dtype=dtype)
        got = module.lowrank_gemm(eye, weight, None, None, None, 1.0, noise=noise).t()
    assert not torch.equal(expected, weight)
    _same(got, expected)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_transposed_lowrank_gemm_reads_the_weight_and_factor_as_stored(backend, dtype):
    """dX's GEMM: ``q`` = W (K, N) and ``v`` = A (r, N) as stored, non-square and strided
    (every dimension different, so an operand read in the wrong orientation cannot fit),
    give ``P W + s · U A`` to float64 within the kernels' tolerance."""
    M, K, N, r = 19, 24, 40, 5
    weight = torch.randn(K, 2 * N, device=DEVICE).to(dtype)[:, ::2]  # strided columns
    lora_A = torch.randn(r, N, device=DEVICE).to(dtype)
    p = torch.randn(M, K, device=DEVICE).to(dtype)
    u = torch.randn(M, r, device=DEVICE).to(dtype)
    got = backend_module(backend).lowrank_gemm(p, weight, None, u, lora_A, 0.7, q_transposed=True)
    expected = p.double() @ weight.double() + 0.7 * u.double() @ lora_A.double()
    assert got.shape == (M, N) and got.dtype == dtype
    assert rel_error(got, expected) < KERNEL_TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_dropout_primitives_regenerate_the_references_mask(backend, dtype):
    """With identity factors each product returns drop(x) itself: the forward's thin
    product, backward's dA product and the rank term's mask in the dX GEMM."""
    x = torch.randn(16, 16, device=DEVICE).to(dtype)
    eye = torch.eye(16, device=DEVICE, dtype=dtype)
    dropout = DropoutSpec(2**64 - 1, 0.4)
    expected = reference.apply_dropout(x, dropout.p, dropout.seed)
    module = backend_module(backend)
    rank_masked = module.lowrank_gemm(
        torch.zeros_like(x),
        torch.zeros_like(eye),
        None,
        x,
        eye,
        1.0,
        q_transposed=True,
        rank_dropout=dropout,
    )
    for got in (
        module.dropout_lowrank(x, eye, dropout),
        module.dropout_lowrank_grad(eye, x, dropout).to(dtype),
        rank_masked,
    ):
        _same(got, expected)
    assert 0.2 < float((expected == 0).float().mean()) < 0.6


@pytest.mark.parametrize("rows", [0, 37, 300], ids=["no-rows", "one-split", "row-splits"])
def test_dropout_lowrank_grad_applies_its_scale(backend, rows):
    """``scale · Gᵀ drop(x)``: the scale taken by the primitive (no pass of the caller's),
    on no rows (zeros), one row range and several (Triton's partials, each scaled)."""
    x = torch.randn(rows, 24, device=DEVICE)
    g = torch.randn(rows, 3, device=DEVICE)
    dropout = DropoutSpec(2**63 + 3, 0.3)
    got = backend_module(backend).dropout_lowrank_grad(g, x, dropout, 0.37)
    expected = 0.37 * (g.double().t() @ reference.apply_dropout(x, 0.3, dropout.seed).double())
    assert got.shape == (3, 24)
    if rows == 0:
        assert torch.equal(got, torch.zeros_like(got))
    else:
        assert rel_error(got, expected) < KERNEL_TOLERANCE[torch.float32]


@pytest.mark.parametrize(
    "bad",
    [0.0, -1.0, float("nan"), float("inf"), 1e-30],
    ids=["zero", "negative", "nan", "inf", "below-floor"],
)
def test_every_backend_refuses_the_same_bad_scales_before_running(backend, scaled_dtype, bad):
    """A scale that is not finite and at least the format's smallest is refused by the
    functional boundary the same way whichever backend would run, before the backend is
    asked (none returns NaN; one without scaled formats refuses the values first)."""
    from lorasc_kernels import ScaledWeight, lorasc_linear
    from lorasc_kernels.formats.quantize import quantize

    weight = quantize(torch.randn(6, 8, device=DEVICE), scaled_dtype)
    scale = weight.scale.clone()
    scale[2] = bad
    x, lora_A, lora_B = (
        torch.randn(3, 8, device=DEVICE),
        torch.randn(2, 8, device=DEVICE),
        torch.randn(6, 2, device=DEVICE),
    )
    with pytest.raises(ValueError, match=r"weight.scale must be positive and finite.* at row 2"):
        lorasc_linear(
            x, ScaledWeight(weight.codes, scale), None, lora_A, lora_B, 1.0, backend=backend
        )
