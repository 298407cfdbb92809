"""merge_lowrank_ on every backend: bit for bit against the reference, in place, by
shards, noise swap, stochastic rounding, non-finite inputs and bad arguments.

Without a GPU the Triton kernel runs on CPU tensors under ``TRITON_INTERPRET=1`` and the
CUDA kernel's data path through its host build (tests/backend_params.py).
"""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lorasc_kernels import merge_lowrank_
from lorasc_kernels import noise as noise_lib
from lorasc_kernels.backends import reference
from tests.backend_params import DEVICE
from tests.helpers import DTYPES, rel_error

MANTISSA_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
NOISE = {"noise_remove": (11, 0.03), "noise_add": (12, 0.05)}


def _inputs(rows, cols, r, dtype, lora_dtype=None):
    """Fresh W (rows, cols) ~ 0.02·N(0, 1), B (rows, r), A (r, cols) in ``lora_dtype``."""
    lora_dtype = lora_dtype or dtype
    weight = (0.02 * torch.randn(rows, cols, device=DEVICE)).to(dtype)
    lora_B = torch.randn(rows, r, device=DEVICE).to(lora_dtype)
    lora_A = (torch.randn(r, cols, device=DEVICE) / cols**0.5).to(lora_dtype)
    return weight, lora_B, lora_A


def _bits(tensor):
    """The raw bit patterns (so that -0.0 differs from +0.0)."""
    return tensor.view({2: torch.int16, 4: torch.int32}[tensor.element_size()])


def _ulp(values, dtype):
    """Spacing of ``dtype`` at each of ``values`` (normal range), float64."""
    _, exponent = torch.frexp(values.double().abs())
    return torch.ldexp(
        torch.ones_like(values, dtype=torch.float64), exponent - 1 - MANTISSA_BITS[dtype]
    )


def _merged(weight, *args, backend, **kwargs):
    out = weight.clone()
    merge_lowrank_(out, *args, backend=backend, **kwargs)
    return out


CASES = (
    [((37, 91, 5), w, ab) for w in DTYPES for ab in DTYPES]
    + [((64, 33, 1), w, w) for w in DTYPES]
    + [((70, 129, 16), w, w) for w in DTYPES]
)
CASE_IDS = [f"{rows}x{cols}r{r}-W{str(w)[6:]}-AB{str(ab)[6:]}" for (rows, cols, r), w, ab in CASES]


@pytest.mark.parametrize("noise", [False, True], ids=["plain", "noise"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("shape,dtype,lora_dtype", CASES, ids=CASE_IDS)
def test_matches_reference_bit_for_bit(backend, shape, dtype, lora_dtype, rounding, noise):
    weight, lora_B, lora_A = _inputs(*shape, dtype, lora_dtype)
    kwargs = dict(rounding=rounding, seed=7, row_offset=13, **(NOISE if noise else {}))
    expected = _merged(weight, lora_B, lora_A, 0.37, backend="torch", **kwargs)
    actual = _merged(weight, lora_B, lora_A, 0.37, backend=backend, **kwargs)
    assert not torch.equal(expected, weight)
    assert torch.equal(_bits(actual), _bits(expected))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nearest_rounds_ties_to_even(backend, dtype):
    """Adding exactly half an ulp to ±1 (even) and ±(1 + ulp) (odd) lands on ties."""
    ulp = 2.0 ** -MANTISSA_BITS[dtype]
    start = torch.tensor([[1.0, 1.0 + ulp, -1.0, -1.0 - ulp]], device=DEVICE)
    lora_B = torch.ones(1, 1, device=DEVICE)
    lora_A = torch.tensor([[1.0, 1.0, -1.0, -1.0]], device=DEVICE)
    weight = start.to(dtype)
    merge_lowrank_(weight, lora_B, lora_A, ulp / 2, rounding="nearest", backend=backend)
    expected = torch.tensor([[1.0, 1.0 + 2 * ulp, -1.0, -1.0 - 2 * ulp]], device=DEVICE)
    assert torch.equal(weight, expected.to(dtype))


# A rank step whose product is exact but below float32's normal range: B A = 2**-149 (the
# smallest subnormal) + 2**-150 (half of it). Rounded once the sum is a tie, 1.5 · 2**-149,
# and goes to even, 2**-148; rounded twice the second product is itself a tie, to 0, and the
# sum stays 2**-149. coeff = 2**100 carries either into float32's normal range exactly.
SUBNORMAL_PRODUCTS = ([[2.0**-75, 2.0**-75]], [[2.0**-74, 1.0], [2.0**-75, 1.0]], 2.0**100)


@pytest.mark.parametrize(
    "lora_dtype, expected",
    [(torch.bfloat16, 2.0**-48), (torch.float16, None), (torch.float32, 2.0**-49)],
)
def test_the_rank_step_rounds_once_when_the_factors_are_16_bit(backend, lora_dtype, expected):
    """The rank step's contract (``reference.lowrank_delta_fp32``): factors of one 16-bit
    dtype have exact products, and each step rounds once (an FMA on the GPU); float32
    factors round the product and the sum each. Only products below float32's normal range
    tell them apart; every backend gives the values computed here by hand. (fp16 factors
    cannot make such a product: it is at least 2**-48, so there both agree.)"""
    rows, cols, coeff = SUBNORMAL_PRODUCTS
    lora_B = torch.tensor(rows, device=DEVICE).to(lora_dtype)
    lora_A = torch.tensor(cols, device=DEVICE).to(lora_dtype)
    if lora_dtype == torch.float16:  # 2**-75 underflows to 0: the product is 0 either way
        assert float(lora_B[0, 0]) == 0.0
        expected = 0.0
    weight = torch.zeros(1, 2, device=DEVICE)
    merge_lowrank_(weight, lora_B, lora_A, coeff, rounding="nearest", backend=backend)
    assert float(weight[0, 0]) == expected


def test_merge_is_in_place(backend):
    weight, lora_B, lora_A = _inputs(37, 91, 5, torch.bfloat16)
    before, pointer = weight.clone(), weight.data_ptr()
    result = merge_lowrank_(weight, lora_B, lora_A, 0.5, backend=backend)
    assert result is weight
    assert weight.data_ptr() == pointer
    assert not torch.equal(weight, before)


def test_shards_equal_whole(backend):
    weight, lora_B, lora_A = _inputs(70, 45, 4, torch.bfloat16)
    kwargs = dict(rounding="stochastic", seed=3, row_offset=5, **NOISE)
    whole = _merged(weight, lora_B, lora_A, 0.8, backend=backend, **kwargs)
    sharded = weight.clone()
    for start, stop in ((0, 17), (17, 19), (19, 70)):  # a shard of fewer rows than r
        kwargs["row_offset"] = 5 + start
        merge_lowrank_(
            sharded[start:stop], lora_B[start:stop], lora_A, 0.8, backend=backend, **kwargs
        )
    assert torch.equal(_bits(sharded), _bits(whole))


def test_reference_row_blocks_do_not_change_bits(monkeypatch):
    weight, lora_B, lora_A = _inputs(70, 45, 4, torch.bfloat16)
    kwargs = dict(rounding="stochastic", seed=3, row_offset=5, **NOISE)
    one_block = _merged(weight, lora_B, lora_A, 0.8, backend="torch", **kwargs)
    monkeypatch.setattr(reference, "MERGE_BLOCK_ELEMENTS", 100)  # blocks of 2 rows
    blocks = _merged(weight, lora_B, lora_A, 0.8, backend="torch", **kwargs)
    assert torch.equal(_bits(blocks), _bits(one_block))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_noise_swap_returns_weight_within_one_rounding_per_merge(backend, dtype):
    """Merge 1 adds c·B A and noise N; merge 2 (coeff 0) removes N: W = W0 + c·B A ± 2 roundings."""
    weight, lora_B, lora_A = _inputs(37, 91, 5, dtype)
    noise_pair = (21, 0.01)
    once = _merged(weight, lora_B, lora_A, 0.05, backend=backend, noise_add=noise_pair, seed=1)
    twice = _merged(once, lora_B, lora_A, 0.0, backend=backend, noise_remove=noise_pair, seed=2)
    noise = noise_pair[1] * noise_lib.noise(noise_pair[0], 37, 91, device=DEVICE).double()
    update = 0.05 * lora_B.double() @ lora_A.double()
    assert (once.double() - weight.double() - update - noise).abs().max() > 0  # N was in W
    error = (twice.double() - weight.double() - update).abs()
    # One rounding per merge, each below one ulp of its result; slack for float32 math.
    bound = _ulp(once, dtype) + _ulp(twice, dtype) + 1e-6 * weight.double().abs().max()
    assert bool((error <= bound).all())


def test_stochastic_rounding_keeps_sub_ulp_updates_nearest_loses_them(backend):
    """``merges`` successive updates of ~0.2 ulp each on W in [1, 2) (ulp = 2**-7)."""
    rows, cols, r, merges = 32, 64, 2, 24
    start = (1.0 + torch.rand(rows, cols, device=DEVICE)).to(torch.bfloat16)
    lora_B = 0.5 + 0.5 * torch.rand(rows, r, device=DEVICE)
    lora_A = 0.5 + 0.5 * torch.rand(r, cols, device=DEVICE)
    ulp = 2.0**-7
    coeff = 0.2 * ulp / float((lora_B @ lora_A).mean())
    assert float((coeff * lora_B @ lora_A).max()) < 0.5 * ulp
    expected_mean = merges * coeff * float((lora_B.double() @ lora_A.double()).mean())
    results = {}
    for rounding in ("nearest", "stochastic"):
        weight = start.clone()
        for step in range(merges):
            merge_lowrank_(
                weight, lora_B, lora_A, coeff, rounding=rounding, seed=step, backend=backend
            )
        results[rounding] = float((weight.double() - start.double()).mean())
    assert results["nearest"] == 0.0  # every update is below half an ulp: all lost
    # Each merge rounds each element with an error of std <= ulp/2, independently.
    standard_error = 0.5 * ulp * math.sqrt(merges / (rows * cols))
    assert abs(results["stochastic"] - expected_mean) < 5 * standard_error
    assert 5 * standard_error < 0.1 * expected_mean


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["lora_A", "lora_B"])
def test_non_finite_lowrank_raises_and_leaves_weight(backend, name, value):
    weight, lora_B, lora_A = _inputs(37, 91, 5, torch.bfloat16)
    tensors = {"lora_B": lora_B, "lora_A": lora_A}
    tensors[name][1, 2] = value
    before = weight.clone()
    with pytest.raises(ValueError, match=f"{name} has non-finite values"):
        merge_lowrank_(weight, tensors["lora_B"], tensors["lora_A"], 0.5, backend=backend)
    assert torch.equal(_bits(weight), _bits(before))


ROWS, COLS, RANK = 9, 12, 3


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        ({"rounding": "up"}, ValueError, "rounding must be one of"),
        ({"rounding": None}, TypeError, "rounding must be a str"),
        ({"lora_A": torch.randn(RANK, COLS + 1)}, ValueError, "lora_A must have shape"),
        ({"lora_B": torch.randn(ROWS + 1, RANK)}, ValueError, "lora_B must have shape"),
        ({"weight": torch.randn(ROWS, COLS, 2)}, ValueError, "weight must be 2-D"),
        ({"weight": torch.ones(ROWS, COLS, dtype=torch.int32)}, TypeError, "weight must have"),
        ({"row_offset": -1}, ValueError, "row_offset must be >= 0"),
        ({"row_offset": 2**32}, ValueError, "row_offset must be <="),
        ({"row_offset": 1.0}, TypeError, "row_offset must be an int"),
        ({"noise_add": (1,)}, TypeError, "noise_add must be None or a"),
        ({"noise_add": 5}, TypeError, "noise_add must be None or a"),
        ({"noise_remove": (1.5, 0.1)}, TypeError, r"noise_remove\[0\] \(seed\)"),
        ({"noise_remove": (1, float("inf"))}, ValueError, r"noise_remove\[1\] \(scale\)"),
        ({"coeff": float("inf")}, ValueError, "coeff must be finite"),
        ({"coeff": float("nan")}, ValueError, "coeff must be finite"),
        ({"coeff": -1e39}, ValueError, "coeff must be within float32's range"),
        ({"noise_add": (1, 1e39)}, ValueError, r"noise_add\[1\] \(scale\) must be within"),
        ({"seed": -1}, ValueError, "seed must be >= 0"),
    ],
)
def test_bad_arguments_raise_and_leave_weight(backend, overrides, error, match):
    weight, lora_B, lora_A = _inputs(ROWS, COLS, RANK, torch.float32)
    arguments = {
        "weight": weight,
        "lora_B": lora_B,
        "lora_A": lora_A,
        "coeff": 0.5,
        "backend": backend,
    }
    arguments.update({k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in overrides.items()})
    before = weight.clone()
    with pytest.raises(error, match=match):
        merge_lowrank_(**arguments)
    assert torch.equal(weight, before)


def test_kernels_reject_float64_and_every_backend_an_overlapping_weight(backend):
    weight, lora_B, lora_A = _inputs(ROWS, COLS, RANK, torch.float64)
    if backend != "torch":
        with pytest.raises(TypeError, match="weight has dtype torch.float64"):
            merge_lowrank_(weight, lora_B, lora_A, 0.5, backend=backend)
    row = torch.randn(1, COLS, device=DEVICE)
    with pytest.raises(ValueError, match="weight has overlapping elements"):
        merge_lowrank_(row.expand(ROWS, COLS), lora_B.float(), lora_A.float(), 0.5, backend=backend)


def test_float32_weight_matches_float64_math(backend):
    weight, lora_B, lora_A = _inputs(37, 91, 5, torch.float32)
    merged = _merged(weight, lora_B, lora_A, 0.4, backend=backend, **NOISE)
    expected = weight.double() + 0.4 * lora_B.double() @ lora_A.double()
    for (seed, scale), sign in ((NOISE["noise_remove"], -1), (NOISE["noise_add"], 1)):
        expected += sign * scale * noise_lib.noise(seed, 37, 91, device=DEVICE).double()
    assert rel_error(merged, expected) < 1e-6


@pytest.mark.parametrize("layout", ["column_slice", "column_major"])
def test_strided_weight(backend, layout):
    """A non-contiguous W merges in place with the bits of its contiguous copy."""
    base, lora_B, lora_A = _inputs(37, 91, 5, torch.bfloat16)
    if layout == "column_slice":
        storage = (0.02 * torch.randn(37, 120, device=DEVICE)).to(torch.bfloat16)
        weight = storage[:, 20:111]
    else:
        storage = base.t().contiguous()
        weight = storage.t()
    untouched = storage.clone()
    contiguous = _merged(weight.contiguous(), lora_B, lora_A, 0.6, backend=backend, **NOISE)
    merge_lowrank_(weight, lora_B, lora_A, 0.6, backend=backend, **NOISE)
    assert torch.equal(_bits(weight), _bits(contiguous))
    if layout == "column_slice":
        assert torch.equal(storage[:, :20], untouched[:, :20])
        assert torch.equal(storage[:, 111:], untouched[:, 111:])


_COMPILE_FOR_HOPPER = textwrap.dedent(
    """
    import re, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from lorasc_kernels.backends.triton.merge import _merge_kernel

    kernel = _merge_kernel
    floats = {"coeff", "remove_scale", "add_scale"}
    constants = {"HAS_REMOVE": True, "HAS_ADD": True, "STOCHASTIC": True, "DROP_BITS": 16,
                 "NEAREST_ON_BITS": True, "INTERPRETING": False, "BLOCK_ROWS": 64,
                 "BLOCK_COLS": 128}
    for fusion, exact in ((False, False), (False, True), (True, False)):
        signature = {
            name: "constexpr" if name in constants or name == "EXACT_PRODUCTS"
            else "*bf16" if name == "weight_ptr" else "*fp32" if name.endswith("_ptr")
            else "fp32" if name in floats else "i32"
            for name in kernel.arg_names
        }
        values = {**constants, "EXACT_PRODUCTS": exact}
        constexprs = {(kernel.arg_names.index(n),): v for n, v in values.items()}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"enable_fp_fusion": fusion, "num_warps": 8})
        print(fusion, exact, len(re.findall(r"fma\\.rn\\.f32", compiled.asm["ptx"])))
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the kernel itself")
def test_kernel_compiles_for_hopper_with_no_fused_multiply_add_but_the_rank_step():
    """Compile (no GPU needed) for sm_90, as launched (fusion off): no fma in the PTX, except
    one per element of a thread (64 × 128 / 256 threads) for the rank step of 16-bit factors
    (their exact products: ``reference.lowrank_delta_fp32``); none in the noise or the
    rounding. Fusion on would contract (the check can fail)."""
    environment = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_HOPPER],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    counts = {tuple(line.split()[:2]): int(line.split()[2]) for line in result.stdout.splitlines()}
    assert counts[("False", "False")] == 0
    assert counts[("False", "True")] == 64 * 128 // 256
    assert counts[("True", "False")] > 0


def test_a_float32_merge_draws_no_rounding_bits(monkeypatch):
    """float32 keeps every bit of the float32 merge: the stochastic-rounding hash (most of a
    CPU merge) is not drawn, and the result is the nearest merge's, bit for bit; bf16 draws
    it."""
    from lorasc_kernels import noise as noise_lib

    drawn = []
    hash_bits = noise_lib.hash_bits
    monkeypatch.setattr(
        noise_lib,
        "hash_bits",
        lambda *args, **kwargs: drawn.append(1) or hash_bits(*args, **kwargs),
    )
    torch.manual_seed(0)
    weight, lora_B, lora_A = torch.randn(9, 7), torch.randn(9, 2), torch.randn(2, 7)
    stochastic, nearest = weight.clone(), weight.clone()
    merge_lowrank_(stochastic, lora_B, lora_A, 0.5, rounding="stochastic", backend="torch")
    assert drawn == []
    merge_lowrank_(nearest, lora_B, lora_A, 0.5, rounding="nearest", backend="torch")
    assert torch.equal(stochastic, nearest)
    merge_lowrank_(weight.bfloat16(), lora_B, lora_A, 0.5, backend="torch")
    assert drawn
