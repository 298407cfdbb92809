"""The sm_90 compile gate: every Triton kernel of the package compiles for Hopper, on a
machine without a GPU, for each autotune config and the flag and dtype combinations the
launchers really use (``tests/sm90_gate.py`` says how they are found and which subset is
compiled). About 3 minutes on 2 cores with an empty Triton cache, seconds with a warm one."""

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tests.sm90_gate import SHARED_LIMIT_BYTES

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    """One result per compile (kernel, config, flags, shared, spill_bytes, fma, sass, or
    error)."""
    environment = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sm90_gate.py")],
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


def test_no_fused_multiply_add_in_the_merge_and_noise_paths(compiled):
    """The merge and the noisy weight must equal the reference bit for bit: launched with
    ``enable_fp_fusion=False``, their PTX holds no ``fma``."""
    rows = [row for row in compiled if _noise_or_merge(row)]
    assert any("merge" in row["kernel"] for row in rows)
    assert any(row["flags"].get("FUSED_NOISE") for row in rows)
    offending = [
        f"{describe(row)}: {row['fma']} fma, fusion {row['options'].get('enable_fp_fusion', True)}"
        for row in rows
        if row["fma"] or row["options"].get("enable_fp_fusion", True)
    ]
    assert not offending, "\n".join(offending)


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
