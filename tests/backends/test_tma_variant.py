"""The persistent TMA variant of the fused GEMM (backends/triton/fused_linear_tma.py): where
it applies, the same computation as the tiled kernel, bit for bit under the interpreter
(one tiling, the same order of sums); the reference's noise and dropout mask bit for bit;
the layer's forward and backward through it; and the fallback rule.

On the CPU the kernel runs in Triton's interpreter, whose tensor descriptors load and store
tiles as TMA does (zero fill outside the tensor, stores clipped); that it compiles to TMA
and wgmma for sm_90 is the compile gate's check (tests/backends/test_sm90_compile.py).
"""

import pytest
import torch

from lorasc_kernels import lorasc_linear
from lorasc_kernels.backends import reference
from lorasc_kernels.backends.specs import DropoutSpec, NoiseSpec
from lorasc_kernels.backends.triton import fused_linear, fused_linear_tma, gemm_dispatch
from lorasc_kernels.formats.quantize import quantize
from tests.backend_params import DEVICE
from tests.helpers import KERNEL_TOLERANCE, lowrank_inputs, rel_error

pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and torch.cuda.get_device_capability() < (9, 0),
    reason="the TMA variant needs compute capability 9.0",
)

NOISE = NoiseSpec(2**64 - 9, 0.05)
DROPOUT = DropoutSpec(2**63 + 11, 0.3)

# (M, K, N, r, bias, noise, rank dropout, q transposed): 16-byte aligned rows; several
# output tiles per program (the interpreter runs 2 programs of 16×16 tiles), partial tiles.
CASES = [
    (40, 64, 48, 5, True, False, False, False),
    (33, 48, 40, 16, False, True, False, False),
    (24, 56, 32, 80, True, False, True, True),  # r > 64: several rank blocks; the dX GEMM
    (20, 32, 24, 3, True, True, True, True),
    (17, 16, 16, 0, False, False, False, False),  # no rank term
]


def _case_id(case):
    M, K, N, r, bias, noise, dropout, transposed = case
    return (
        f"{M}x{K}x{N}-r{r}{'-bias' if bias else ''}{'-noise' if noise else ''}"
        f"{'-dropout' if dropout else ''}{'-dX' if transposed else ''}"
    )


def _gemm_arguments(case, dtype):
    M, K, N, r, bias, noise, dropout, transposed = case
    p = torch.randn(M, K, device=DEVICE).to(dtype)
    weight = (torch.randn(K, N) if transposed else torch.randn(N, K)).to(DEVICE, dtype)
    u = torch.randn(M, r, device=DEVICE).to(dtype) if r else None
    v = torch.randn(*((r, N) if transposed else (N, r)), device=DEVICE).to(dtype) if r else None
    b = torch.randn(N, device=DEVICE).to(dtype) if bias else None
    return (p, weight, b, u, v, 1.5), dict(
        noise=NOISE if noise else None,
        q_transposed=transposed,
        rank_dropout=DROPOUT if dropout else None,
    )


def _float64(p, q, b, u, v, scale, noise, q_transposed, rank_dropout):
    """The GEMM in float64, from the reference's noisy weight and dropout mask (``q`` and
    ``v`` as stored, read transposed with ``q_transposed``)."""
    weight = q if noise is None else reference.noisy_weight(q, noise.seed, noise.scale)
    out = p.double() @ (weight.double() if q_transposed else weight.double().t())
    if u is not None:
        rank = u.double() @ (v.double() if q_transposed else v.double().t())
        if rank_dropout is not None:
            rank = reference.apply_dropout(rank, rank_dropout.p, rank_dropout.seed)
        out += scale * rank
    return out if b is None else out + b.double()


@pytest.mark.parametrize("dtype", fused_linear_tma.TMA_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_persistent_equals_tiled_and_float64(case, dtype):
    args, kwargs = _gemm_arguments(case, dtype)
    assert fused_linear_tma.unsupported_reason(args[0], args[1], kwargs["q_transposed"]) is None
    got = fused_linear_tma.persistent_lowrank_gemm(*args, **kwargs)
    tiled = fused_linear.tiled_lowrank_gemm(*args, **kwargs)
    assert got.dtype == dtype and got.shape == tiled.shape
    if DEVICE == "cpu":
        assert torch.equal(got, tiled)
    assert rel_error(got, tiled) < KERNEL_TOLERANCE[dtype]
    assert rel_error(got, _float64(*args, **kwargs)) < KERNEL_TOLERANCE[dtype]


@pytest.mark.parametrize("q_transposed", [False, True], ids=["W", "W_t"])
def test_persistent_adds_the_references_noise(q_transposed):
    """An identity P returns the noisy weight itself: the noise of the loaded tiles is the
    reference's, bit for bit, in either orientation."""
    weight = (torch.randn(48, 32, device=DEVICE) / 7).to(torch.bfloat16)
    expected = reference.noisy_weight(weight, NOISE.seed, NOISE.scale)
    if q_transposed:
        eye = torch.eye(48, device=DEVICE, dtype=torch.bfloat16)
        got = fused_linear_tma.persistent_lowrank_gemm(
            eye, weight, None, None, None, 1.0, NOISE, q_transposed=True
        )
    else:
        eye = torch.eye(32, device=DEVICE, dtype=torch.bfloat16)
        got = fused_linear_tma.persistent_lowrank_gemm(
            eye, weight, None, None, None, 1.0, NOISE
        ).t()
    assert not torch.equal(expected, weight)
    assert torch.equal(got, expected)


def test_persistent_applies_the_references_dropout_mask():
    """Identity factors make the rank term ``drop(x)`` itself, as the dX GEMM masks it."""
    x = torch.randn(32, 32, device=DEVICE).to(torch.float16)
    eye = torch.eye(32, device=DEVICE, dtype=torch.float16)
    got = fused_linear_tma.persistent_lowrank_gemm(
        torch.zeros_like(x),
        torch.zeros_like(eye),
        None,
        x,
        eye,
        1.0,
        q_transposed=True,
        rank_dropout=DROPOUT,
    )
    expected = reference.apply_dropout(x, DROPOUT.p, DROPOUT.seed)
    assert torch.equal(got, expected)
    assert 0.15 < float((expected == 0).float().mean()) < 0.45


def test_layer_forward_and_backward_through_the_persistent_variant(monkeypatch):
    """The linear's y and grads with the persistent variant forced equal the tiled kernel's
    (bit for bit in the interpreter), noise and dropout on."""
    x, weight, b, lora_A, lora_B = lowrank_inputs(24, 32, 40, 4, torch.bfloat16, DEVICE)
    dy = torch.randn(24, 40, device=DEVICE).to(torch.bfloat16)

    def run(variant):
        monkeypatch.setattr(gemm_dispatch, "mode", variant)
        leaves = [t.detach().requires_grad_(True) for t in (x, b, lora_A, lora_B)]
        y = lorasc_linear(
            leaves[0],
            weight,
            *leaves[1:],
            2.0,
            dropout_p=0.2,
            noise_seed=5,
            noise_scale=0.05,
            backend="triton",
            dropout_seed=9,
        )
        y.backward(dy)
        return [y.detach()] + [leaf.grad for leaf in leaves]

    for got, tiled in zip(run("persistent"), run("tiled"), strict=True):
        if DEVICE == "cpu":
            assert torch.equal(got, tiled)
        assert rel_error(got, tiled) < KERNEL_TOLERANCE[torch.bfloat16]


def test_fallback_rule():
    """16-bit, unscaled, a unit stride, 16-byte aligned base pointers and strides; else the
    tiled kernel."""
    bf16 = torch.randn(16, 64, device=DEVICE).to(torch.bfloat16)
    weight = torch.randn(24, 64, device=DEVICE).to(torch.bfloat16)
    codes = quantize(weight.float(), torch.float8_e4m3fn).codes
    reason = fused_linear_tma.unsupported_reason
    assert reason(bf16, weight) is None
    assert reason(bf16, weight.t().contiguous().t()) is None  # Wᵀ read as stored
    assert reason(bf16.half(), weight.half()) is None
    assert "bf16/fp16" in reason(bf16.float(), weight.float())
    assert "bf16/fp16" in reason(bf16, weight.half())
    assert "bf16/fp16" in reason(bf16, codes)
    assert "unit stride" in reason(bf16[:, ::2], weight[:, ::2])
    assert "aligned" in reason(bf16[:, 1:], weight[:, 1:])  # base pointer 2 bytes off
    assert reason(bf16[:, :60], weight[:, :60]) is None  # strides stay 128 bytes
    assert "aligned" in reason(bf16, weight[:20])  # out (16, 20): 40-byte rows
    assert "aligned" in reason(bf16[:, :60].contiguous(), weight[:, :60])  # 120-byte P rows


def test_forced_persistent_falls_back_to_tiled_where_tma_does_not_apply(monkeypatch):
    """A layout TMA cannot read runs the tiled kernel, with the same result."""
    monkeypatch.setattr(gemm_dispatch, "mode", "persistent")
    p = torch.randn(16, 45, device=DEVICE).to(torch.bfloat16)  # 90-byte rows
    q = torch.randn(24, 45, device=DEVICE).to(torch.bfloat16)
    assert "aligned" in fused_linear_tma.unsupported_reason(p, q)
    assert gemm_dispatch.candidates(p, q, None, None, None, None) == ("tiled", "addmm")
    got = gemm_dispatch.lowrank_gemm(p, q, None, None, None, 1.0)
    assert torch.equal(got, fused_linear.tiled_lowrank_gemm(p, q, None, None, None, 1.0))


@pytest.mark.gpu
def test_gpu_persistent_and_measured_layer_at_the_headline_specialization(monkeypatch):
    """On the GPU, the layer's y and grads with the persistent variant forced, then with the
    measured choice, against float64. bf16, no bias, no dropout, sizes divisible by 16: the
    kernels the headline benchmark compiles next (shared Triton cache), at M = 1024."""
    x, weight, _, lora_A, lora_B = lowrank_inputs(
        1024, 4096, 4096, 16, torch.bfloat16, "cuda", bias=False
    )
    dy = torch.randn(1024, 4096, device="cuda").to(torch.bfloat16)
    leaves64 = [t.double().requires_grad_(True) for t in (x, lora_A, lora_B)]
    y64 = (
        leaves64[0] @ weight.double().t() + 2.0 * (leaves64[0] @ leaves64[1].t()) @ leaves64[2].t()
    )
    y64.backward(dy.double())
    for variant in ("persistent", "measure"):
        monkeypatch.setattr(gemm_dispatch, "mode", variant)
        leaves = [t.detach().requires_grad_(True) for t in (x, lora_A, lora_B)]
        y = lorasc_linear(leaves[0], weight, None, *leaves[1:], 2.0, backend="triton")
        y.backward(dy)
        assert rel_error(y, y64.detach()) < KERNEL_TOLERANCE[torch.bfloat16], variant
        for leaf, leaf64 in zip(leaves, leaves64, strict=True):
            assert rel_error(leaf.grad, leaf64.grad) < KERNEL_TOLERANCE[torch.bfloat16], variant
    measured = [
        key
        for key in gemm_dispatch.DISPATCH.chosen
        if key.n == 4096 and key.k == 4096 and key.m_bucket == 1024
    ]
    assert len(measured) == 2  # forward and dX
