"""The sm_90 compile gate: every Triton kernel of the package compiles for Hopper, on a
machine without a GPU, for each autotune config and the flag and dtype combinations the
launchers really use (``tests/backends/sm90_gate.py`` says how they are found and which subset is
compiled). About 3 minutes on 2 cores with an empty Triton cache, seconds with a warm one."""

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tests.backends.sm90_gate import SHARED_LIMIT_BYTES

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    """One result per compile (kernel, config, flags, shared, spill_bytes, fma, sass, or
    error)."""
    environment = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "backends" / "sm90_gate.py")],
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert rows, result.stderr[-3000:]
    return rows


def describe(row: dict) -> str:
    flags = ", ".join(f"{k}={v}" for k, v in row.get("flags", {}).items() if k != "INTERPRETING")
    return f"{row['kernel'].split(':')[1]} {row.get('operand')} [{row.get('config')}] {flags}"


def test_every_kernel_is_launched_and_compiles_for_sm90(compiled):
    failures = [f"{describe(row)}: {row['error']}" for row in compiled if "error" in row]
    assert not failures, "\n".join(failures)
    kernels = {row["kernel"] for row in compiled}
    names = {name.split(":")[1] for name in kernels}
    assert any("fused" in name for name in names) and any("merge" in name for name in names)
    reasons = {row["reason"] for row in compiled}
    assert any(reason.startswith("every config") for reason in reasons)


def test_shared_memory_fits_hopper(compiled):
    over = [
        f"{describe(row)}: {row['shared']} bytes"
        for row in compiled
        if row["shared"] > SHARED_LIMIT_BYTES
    ]
    assert not over, "\n".join(over)


def _noise_or_merge(row: dict) -> bool:
    name = row["kernel"].split(":")[1].lower()
    noisy_flag = any("NOISE" in k for k, v in row["flags"].items() if v is True)
    return "merge" in name or "noise" in name or noisy_flag


def _elements_per_thread(row: dict) -> int:
    flags = row["flags"]
    return flags["BLOCK_ROWS"] * flags["BLOCK_COLS"] // (32 * row["options"]["num_warps"])


def test_no_fused_multiply_add_in_the_merge_and_noise_paths_but_the_rank_step(compiled):
    """The merge and the noisy weight must equal the reference bit for bit: launched with
    ``enable_fp_fusion=False``, their PTX holds no ``fma``, except the merge's rank step
    with 16-bit factors (``EXACT_PRODUCTS``: exact products, one rounding, as
    ``reference.lowrank_delta_fp32``): at most one fma per element of a thread per sweep."""
    rows = [row for row in compiled if _noise_or_merge(row)]
    assert any("merge" in row["kernel"] for row in rows)
    assert any(row["flags"].get("FUSED_NOISE") for row in rows)
    assert any(row["flags"].get("EXACT_PRODUCTS") for row in rows)

    def allowed(row: dict) -> int:
        if not row["flags"].get("EXACT_PRODUCTS"):
            return 0
        sweeps = 2 if "scaled" in row["kernel"] else 1
        return sweeps * _elements_per_thread(row)

    offending = [
        f"{describe(row)}: {row['fma']} fma (allowed {allowed(row)}), fusion "
        f"{row['options'].get('enable_fp_fusion', True)}"
        for row in rows
        if row["fma"] > allowed(row) or row["options"].get("enable_fp_fusion", True)
    ]
    assert not offending, "\n".join(offending)


# The merge's rank loop, per element of a thread and per rank: one FMA with 16-bit factors
# (loads and addresses amortized over the thread's elements), a multiply and an add else.
RANK_LOOP_BUDGET = {True: 2.5, False: 3.5}


def test_the_merge_rank_loop_fits_its_instruction_budget(compiled):
    """The merge kernel's rank loop (its innermost loop in the SASS), for every launch:
    at most :data:`RANK_LOOP_BUDGET` instructions per element per rank, and no 16-bit load
    in it (the launcher passes the factors in float32, widened once)."""
    rows = [row for row in compiled if row["kernel"].endswith(":_merge_kernel")]
    assert {row["flags"]["EXACT_PRODUCTS"] for row in rows} == {True, False}
    over = []
    for row in rows:
        loop = row["sass"]["largest_loop"]
        per_element = loop["instructions"] / _elements_per_thread(row)
        if per_element > RANK_LOOP_BUDGET[row["flags"]["EXACT_PRODUCTS"]] or loop["u16_loads"]:
            over.append(f"{describe(row)}: {per_element:.2f} per element per k, {loop}")
    assert not over, "\n".join(over)


def spill_table(rows: list[dict]) -> str:
    return "\n".join(f"{row['spill_bytes']:6d} B  {describe(row)}" for row in rows)


def test_no_register_spills_in_16_bit_configs(compiled):
    spilled = [row for row in compiled if row["spill_bytes"] and row["operand"] != "fp32"]
    fp32 = [row for row in compiled if row["spill_bytes"] and row["operand"] == "fp32"]
    if fp32:
        warnings.warn(f"fp32 configs that spill on sm_90:\n{spill_table(fp32)}", stacklevel=1)
    assert not spilled, f"16-bit configs that spill on sm_90:\n{spill_table(spilled)}"


def test_fused_linear_runs_on_hopper_warpgroup_mma(compiled):
    """Every compile of the fused linear kernel uses wgmma (``HGMMA`` in the SASS), never
    the warp-level ``HMMA`` of earlier GPUs."""
    rows = [row for row in compiled if "fused" in row["kernel"].split(":")[1]]
    assert rows
    off_path = [
        f"{describe(row)}: {row['sass']}"
        for row in rows
        if not row["sass"]["HGMMA"] or row["sass"]["HMMA"]
    ]
    assert not off_path, "\n".join(off_path)


def test_the_scaled_weight_goes_from_registers_into_the_mma(compiled):
    """The fp8 linear (backends/triton/fused_linear_scaled.py, both variants) converts its
    weight tiles in registers and feeds them to warpgroup MMA as the register operand: its
    main loop (the largest innermost loop) stores nothing to shared memory, and it uses
    ``HGMMA``; the persistent variant loads its tiles by TMA (``UTMALDG``)."""
    kernels = (":_scaled_lowrank_kernel", ":_persistent_scaled_kernel")
    rows = [row for row in compiled if row["kernel"].endswith(kernels)]
    for kernel in kernels:
        flags = {row["flags"]["W_TRANSPOSED"] for row in rows if row["kernel"].endswith(kernel)}
        assert flags == {True, False}, kernel
    off_path = [
        f"{describe(row)}: {row['sass']}"
        for row in rows
        if row["sass"]["largest_loop"]["shared_stores"]
        or not row["sass"]["HGMMA"]
        or ("persistent" in row["kernel"] and not row["sass"]["UTMALDG"])
    ]
    assert not off_path, "\n".join(off_path)


def test_persistent_linear_loads_its_tiles_through_tma(compiled):
    """Every compile of the persistent variant (backends/triton/fused_linear_tma.py) loads
    its operand tiles with TMA (``UTMALDG`` in the SASS) into warpgroup MMA (``HGMMA``)."""
    rows = [row for row in compiled if "persistent" in row["kernel"]]
    assert rows
    off_path = [
        f"{describe(row)}: {row['sass']}"
        for row in rows
        if not row["sass"]["UTMALDG"] or not row["sass"]["HGMMA"]
    ]
    assert not off_path, "\n".join(off_path)
