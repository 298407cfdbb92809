"""The two fused GEMM variants of a scaled (fp8) weight (backends/triton/fused_linear_scaled.py
and fused_linear_scaled_tma.py): the persistent TMA kernel computes what the tiled one does,
bit for bit under the interpreter
(same tiling, same order of sums), forward and dX, with bias, dropout and any rank; where
it does not apply the dispatch keeps the tiled one; a layer trains the same through either.
That both feed the converted weight to the MMA from registers is the compile gate's check
(tests/backends/test_sm90_compile.py); their agreement with float64 math,
tests/test_fp8_linear.py's.
"""

import pytest
import torch

from benchmarks.bench_host import LaunchCounter
from lorasc_kernels import LoRASCLinear
from lorasc_kernels.backends.specs import DropoutSpec
from lorasc_kernels.backends.triton import gemm_dispatch
from lorasc_kernels.backends.triton.fused_linear_scaled import scaled_lowrank_gemm
from lorasc_kernels.backends.triton.fused_linear_scaled_tma import (
    persistent_scaled_lowrank_gemm,
    scaled_unsupported_reason,
)
from lorasc_kernels.formats.quantize import quantize
from tests.backend_params import DEVICE

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and torch.cuda.get_device_capability() < (9, 0),
    reason="the TMA variant needs compute capability 9.0",
)

# (M, N, K, r, bias, dropout): rows of 16-byte multiples; several output tiles per program
# under the interpreter (two programs), partial tiles, several rank blocks, no rank term.
CASES = [
    (40, 48, 64, 5, True, False),
    (33, 32, 48, 16, False, True),
    (24, 40, 64, 80, True, True),
    (17, 16, 16, 0, True, False),
]


def _inputs(M, N, K, r, bias, scaled_dtype, transposed):
    torch.manual_seed(M * N + r)
    weight = quantize(torch.randn(N, K, device=DEVICE), scaled_dtype)
    out_features = K if transposed else N
    p = torch.randn(M, N if transposed else K, device=DEVICE).bfloat16()
    u = torch.randn(M, r, device=DEVICE).bfloat16() if r else None
    v_shape = (r, out_features) if transposed else (out_features, r)  # dX: A as stored
    v = torch.randn(*v_shape, device=DEVICE).bfloat16() if r else None
    b = torch.randn(out_features, device=DEVICE).bfloat16() if bias and not transposed else None
    return p, weight, b, u, v


@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "dX"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}x{c[1]}x{c[2]}r{c[3]}" for c in CASES])
def test_the_persistent_variant_equals_the_tiled_one(scaled_dtype, case, transposed):
    M, N, K, r, bias, dropout = case
    p, weight, b, u, v = _inputs(M, N, K, r, bias, scaled_dtype, transposed)
    assert scaled_unsupported_reason(p, weight) is None
    drop = DropoutSpec(2**63 + 5, 0.25) if dropout and r else None
    arguments = (p, weight, b, u, v, 0.7, transposed, drop)
    tiled = scaled_lowrank_gemm(*arguments)
    persistent = persistent_scaled_lowrank_gemm(*arguments)
    assert tiled.shape == (M, K if transposed else N)
    assert torch.equal(persistent, tiled)


def test_where_the_persistent_variant_does_not_apply_the_tiled_one_runs():
    """Misaligned codes (a column slice), float32 inputs, or output rows that are not a
    multiple of 16 bytes: a reason, and the dispatch's only candidate is the tiled kernel."""
    weight = quantize(torch.randn(48, 72, device=DEVICE), torch.float8_e4m3fn)
    p = torch.randn(8, 64, device=DEVICE).bfloat16()
    sliced = type(weight)(weight.codes[:, 8:], weight.scale)
    assert "aligned" in scaled_unsupported_reason(p, sliced)
    assert "bf16/fp16" in scaled_unsupported_reason(p.float(), sliced)
    narrow = quantize(torch.randn(44, 64, device=DEVICE), torch.float8_e4m3fn)
    assert "16 bytes" in scaled_unsupported_reason(p, narrow)
    for bad in (sliced, narrow):
        assert gemm_dispatch.candidates(p, bad, None, None, None, None) == ("tiled",)
    good = quantize(torch.randn(48, 64, device=DEVICE), torch.float8_e4m3fn)
    assert gemm_dispatch.candidates(p, good, None, None, None, None) == ("tiled", "persistent")


def test_an_fp8_layer_trains_the_same_through_either_variant(scaled_dtype, monkeypatch):
    """Forward and every gradient of a ``LoRASCLinear`` with an fp8 weight, the variant
    forced by the dispatch's switch: the same bits."""
    torch.manual_seed(3)
    layer = LoRASCLinear(64, 48, r=8, backend="triton", dtype=torch.bfloat16, bias=True)
    layer = LoRASCLinear.from_linear(
        layer.to_linear(), r=8, backend="triton", weight_format=_format_name(scaled_dtype)
    )
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(20, 64, dtype=torch.bfloat16, requires_grad=True)
    results = []
    kernels = {"tiled": "_scaled_lowrank_kernel", "persistent": "_persistent_scaled_kernel"}
    for variant, kernel in kernels.items():
        monkeypatch.setattr(gemm_dispatch, "mode", variant)
        x.grad = None
        layer.zero_grad()
        with LaunchCounter() as launches:
            y = layer(x)
            y.float().square().sum().backward()
        assert launches.by_kernel[kernel] == 2  # the forward and the dX GEMM
        results.append((y, x.grad, layer.lora_A.grad, layer.lora_B.grad))
    for tiled, persistent in zip(*results, strict=True):
        assert torch.equal(tiled, persistent)


def _format_name(scaled_dtype: torch.dtype) -> str:
    from lorasc_kernels.formats.registry import scaled_weight_dtype

    return scaled_weight_dtype(scaled_dtype).name
