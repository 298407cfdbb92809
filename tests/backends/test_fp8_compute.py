"""The fp8 compute mode's primitives (backends/contract.py's ComputeBackend): the Triton
kernels (backends/triton/fp8_compute.py, the interpreter without a GPU) against the torch
reference, and the reference against float64 math.

Bit for bit: the quantized rows (codes and scales, with or without W's column scales
folded in), and the GEMM where every partial sum is exact in float32 (then the order of
the sums cannot matter). Otherwise the GEMMs agree within float32's summation order: the
interpreter's dot and torch's matmul sum the exact fp8 products in different orders.
"""

import inspect

import pytest
import torch

from lorasc_kernels.backends import BACKENDS, backend_module, reference
from lorasc_kernels.backends.contract import COMPUTE_PRIMITIVES, ComputeBackend
from lorasc_kernels.backends.specs import DropoutSpec
from lorasc_kernels.formats.quantize import quantize
from lorasc_kernels.formats.registry import ACTIVATION_FORMAT, KERNEL_DTYPES, WEIGHT_FORMATS
from lorasc_kernels.formats.scaled_weight import ScaledWeight
from tests.backend_params import DEVICE

pytest.importorskip("triton")
from lorasc_kernels.backends.triton import fp8_compute  # noqa: E402

E4M3 = WEIGHT_FORMATS[ACTIVATION_FORMAT]
# The relative rounding of one float32 addition; on a GPU, of Hopper's fp8 MMA accumulator
# within a 128-deep K step (about 14 bits kept: DeepSeek-V3's report; not measured here).
SUM_UNIT = 2.0**-23 if DEVICE == "cpu" else 2.0**-13
# design.md §7: the tolerance of a product in x's dtype, relative to the output's largest
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 5e-4}


def _bytes(codes: torch.Tensor) -> torch.Tensor:
    return codes.view(torch.uint8)


def _ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at ``values`` (float64), at least its smallest normal's."""
    info = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(values.abs().clamp(min=info.tiny)))
    return torch.exp2(exponent) * info.eps


@pytest.mark.parametrize("name", [name for name in BACKENDS if name != "auto"])
def test_backends_with_a_compute_mode_have_the_protocols_signatures(name):
    try:
        module = backend_module(name)
    except ImportError as error:
        pytest.skip(f"backend {name!r} cannot be imported here: {error}")
    present = [hasattr(module, primitive) for primitive in COMPUTE_PRIMITIVES]
    assert all(present) or not any(present), f"{name}: all compute primitives or none"
    if not any(present):
        return
    assert isinstance(module, ComputeBackend) and "fp8" in module.COMPUTE_MODES
    for primitive in COMPUTE_PRIMITIVES:
        expected = list(inspect.signature(getattr(ComputeBackend, primitive)).parameters)[1:]
        assert list(inspect.signature(getattr(module, primitive)).parameters) == expected


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_the_reference_quantizes_rows_as_torch_converts_them(dtype):
    """Per-row absmax scales (``max |row| / 448``, one ulp up where needed, 1 for a zero row)
    and torch's own round-to-nearest conversion of ``row / scale``."""
    magnitudes = torch.logspace(-6, 3, 23, device=DEVICE)[:, None]
    values = (torch.randn(23, 41, device=DEVICE) * magnitudes).to(dtype)
    values[3] = 0
    col_scale = torch.rand(41, device=DEVICE) + 0.25
    rows, pl = reference.quantize_rows(values, col_scale)
    scaled = values.float() * col_scale
    peak = scaled.abs().amax(1)
    expected_scale = torch.where(peak > 0, peak / 448, torch.ones_like(peak))
    bumped = peak / expected_scale > 448
    expected_scale[bumped] = expected_scale[bumped].nextafter(torch.tensor(float("inf")))
    assert pl is None and rows.dtype == E4M3
    assert torch.equal(rows.scale, expected_scale)
    assert torch.equal(_bytes(rows.codes), _bytes((scaled / expected_scale[:, None]).to(E4M3)))
    assert rows.codes.float().abs().amax(1)[peak > 0].eq(448).all()


# (M, K, r, dropout): odd sizes, several tiles and sweeps under the interpreter (16 × 16
# tiles), no thin product, one rank block and two.
QUANTIZE_CASES = [(37, 53, 5, None), (16, 16, 0, None), (45, 70, 17, 0.25), (3, 130, 64, 0.5)]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("case", QUANTIZE_CASES, ids=str)
@pytest.mark.parametrize("column_scales", [False, True], ids=["x", "dY_sw"])
def test_triton_quantizes_rows_bit_for_bit(dtype, case, column_scales):
    M, K, r, p = case
    x = (torch.randn(M, K, device=DEVICE) * torch.logspace(-3, 2, M, device=DEVICE)[:, None]).to(
        dtype
    )
    x[M // 2] = 0
    x_strided = torch.empty(K, M, device=DEVICE, dtype=dtype).t().copy_(x)  # column-major
    col_scale = torch.rand(K, device=DEVICE) * 2**-5 + 2**-7 if column_scales else None
    lowrank = torch.randn(K, r, device=DEVICE).to(dtype).t() if r else None  # strided (r, K)
    dropout = DropoutSpec(2**64 - 3, p) if p else None
    expected, expected_pl = reference.quantize_rows(x, col_scale, lowrank, dropout)
    rows, pl = fp8_compute.quantize_rows(x_strided, col_scale, lowrank, dropout)
    assert rows.dtype == E4M3 and rows.codes.is_contiguous()
    assert torch.equal(rows.scale, expected.scale)
    assert torch.equal(_bytes(rows.codes), _bytes(expected.codes))
    if r == 0:
        assert pl is None
        return
    assert pl.dtype == dtype and pl.shape == (M, r)
    tolerance = TOLERANCE[dtype] * expected_pl.abs().amax().item()  # design.md §7, x's dtype
    torch.testing.assert_close(pl, expected_pl, rtol=0, atol=tolerance)


def _operands(M, N, K, r, dtype, weight_dtype, q_transposed):
    """Quantized rows ``a`` (M, K), a scaled weight (N, K) or, for dX, (K, N) (its row scales
    then folded into ``a``'s columns, as backward does), and the rank term's factors (``v``
    (N, r), for dX (r, N)), bias."""
    shape = (K, N) if q_transposed else (N, K)
    weight = quantize(torch.randn(*shape, device=DEVICE) * 0.02, weight_dtype)
    col_scale = weight.scale if q_transposed else None  # dX: W's row scales fold into dY
    a, _ = reference.quantize_rows(torch.randn(M, K, device=DEVICE).to(dtype), col_scale)
    u = torch.randn(M, r, device=DEVICE).to(dtype) if r else None
    v_shape = (r, N) if q_transposed else (N, r)  # dX: A as stored
    v = torch.randn(*v_shape, device=DEVICE).to(dtype) if r else None
    bias = None if q_transposed else torch.randn(N, device=DEVICE).to(dtype)
    return a, weight, bias, u, v


def _float64(a, weight, bias, u, v, scale, q_transposed, dropout):
    """The GEMM in float64 on the exact operand values (the rank term's mask as the
    reference draws it)."""
    b = weight.codes.double() if q_transposed else weight.dequantize(torch.float64)
    out = (a.codes.double() * a.scale.double()[:, None]) @ (b if q_transposed else b.t())
    if bias is not None:
        out += bias.double()
    if u is not None:
        rank = u.double() @ (v.double() if q_transposed else v.double().t())
        if dropout is not None:
            rank = reference.apply_dropout(rank, dropout.p, dropout.seed)
        out += scale * rank
    return out


# (M, N, K, r, dropout): odd sizes, several K steps, partial tiles, no rank term.
GEMM_CASES = [(37, 29, 53, 5, None), (16, 48, 16, 0, None), (45, 23, 70, 17, 0.3)]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("weight_dtype", list(fp8_compute.SCALED_DTYPES), ids=str)
@pytest.mark.parametrize("case", GEMM_CASES, ids=str)
@pytest.mark.parametrize("q_transposed", [False, True], ids=["forward", "dX"])
def test_triton_gemm_matches_the_reference_and_float64(dtype, weight_dtype, case, q_transposed):
    """Within the summation order's bound of the reference (16-bit outputs: plus one unit in
    the last place, the rounding that order may flip), and within the same of float64
    math."""
    M, N, K, r, p = case
    a, weight, bias, u, v = _operands(M, N, K, r, dtype, weight_dtype, q_transposed)
    dropout = DropoutSpec(11, p) if p and q_transposed else None  # the dX GEMM's rank mask
    args = (a, weight, bias, u, v, 0.75, dtype, q_transposed, dropout)
    got = fp8_compute.scaled_rows_gemm(*args).double()
    expected = reference.scaled_rows_gemm(*args).double()
    exact = _float64(a, weight, bias, u, v, 0.75, q_transposed, dropout)
    assert got.shape == (M, N)
    # |Σ| ≤ Σ|·|: float32 sums of K (+ r + 1) terms in any order are within (K + r + 1) ulp
    magnitude = _float64(
        ScaledWeight(a.codes.abs(), a.scale),
        ScaledWeight(weight.codes.abs(), weight.scale),
        None if bias is None else bias.abs(),
        None if u is None else u.abs(),
        None if v is None else v.abs(),
        0.75,
        q_transposed,
        None,
    )
    order = (K + r + 2) * SUM_UNIT * magnitude
    if dtype == torch.float32:
        assert ((got - expected).abs() <= order).all()
    else:  # and the output's rounding, which that order may flip by one unit
        assert ((got - expected).abs() <= order + _ulp(expected, dtype)).all()
    assert ((got - exact).abs() <= order + _ulp(exact, dtype)).all()


@pytest.mark.parametrize("weight_dtype", list(fp8_compute.SCALED_DTYPES), ids=str)
@pytest.mark.parametrize("q_transposed", [False, True], ids=["forward", "dX"])
def test_triton_gemm_is_bit_identical_where_every_sum_is_exact(weight_dtype, q_transposed):
    """Integer codes up to 4 and power-of-two scales: every product and partial sum is an
    integer below 2¹¹ times a power of two, exact in float32 (and in an fp8 MMA's narrower
    accumulator) in any order, so the kernel, the reference and float64 agree bit for bit
    (a wrong code, scale or index would not)."""
    M, N, K = 37, 29, 70
    a_codes = torch.randint(-4, 5, (M, K), device=DEVICE).float()
    a_scale = torch.exp2(torch.randint(-8, 8, (M,), device=DEVICE).float())
    a = ScaledWeight(a_codes.to(E4M3), a_scale)
    shape = (K, N) if q_transposed else (N, K)
    weight_codes = torch.randint(-4, 5, shape, device=DEVICE).float().to(weight_dtype)
    weight_scale = torch.exp2(torch.randint(-8, 8, (shape[0],), device=DEVICE).float())
    weight = ScaledWeight(weight_codes, weight_scale)
    args = (a, weight, None, None, None, 1.0, torch.float32, q_transposed)
    got = fp8_compute.scaled_rows_gemm(*args)
    assert torch.equal(got, reference.scaled_rows_gemm(*args))
    assert torch.equal(got.double(), _float64(a, weight, None, None, None, 1.0, q_transposed, None))
