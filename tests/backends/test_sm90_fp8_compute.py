"""The sm_90 compile gate for the fp8 compute mode's kernels (backends/triton/fp8_compute.py):
``tests/backends/sm90_gate.py`` restricted to that module (``LORASC_GATE_ONLY``), every
autotune config of the launches its ``exercise_fp8_compute`` makes. About a minute on 2
cores with an empty Triton cache."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.backends.sm90_gate import ONLY, SHARED_LIMIT_BYTES

ROOT = Path(__file__).resolve().parents[2]
MODULE = "lorasc_kernels.backends.triton.fp8_compute"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    """One result per compile of the module's kernels (sm90_gate.compile_job's fields)."""
    environment = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT), ONLY: MODULE}
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


def _describe(row: dict) -> str:
    flags = ", ".join(f"{k}={v}" for k, v in row.get("flags", {}).items() if k != "INTERPRETING")
    return f"{row['kernel'].split(':')[1]} {row.get('operand')} [{row.get('config')}] {flags}"


def _of(compiled, kernel: str) -> list[dict]:
    return [row for row in compiled if row["kernel"] == f"{MODULE}:{kernel}"]


def test_both_kernels_compile_within_hoppers_shared_memory(compiled):
    failures = [f"{_describe(row)}: {row['error']}" for row in compiled if "error" in row]
    assert not failures, "\n".join(failures)
    assert _of(compiled, "_quantize_rows_kernel") and _of(compiled, "_scaled_rows_gemm_kernel")
    over = [_describe(row) for row in compiled if row["shared"] > SHARED_LIMIT_BYTES]
    assert not over, "\n".join(over)


def test_no_local_memory_in_any_config(compiled):
    """No register spills and no local-memory loads or stores, every config and dtype."""
    offending = [
        f"{_describe(row)}: spills {row['spill_bytes']} B, {row['sass']}"
        for row in compiled
        if row["spill_bytes"] or row["sass"]["LDL"] or row["sass"]["STL"]
    ]
    assert not offending, "\n".join(offending)


def test_the_gemm_runs_on_fp8_warpgroup_mma_forward_and_dx(compiled):
    """Every compile of the GEMM, forward and dX, e4m3 and e5m2 weights, multiplies its fp8
    operands by ``QGMMA`` (Hopper's fp8 wgmma), never the warp-level ``HMMA`` (the rank
    term of the epilogue, in ``x``'s dtype, is ``HGMMA``)."""
    rows = _of(compiled, "_scaled_rows_gemm_kernel")
    assert {row["flags"]["B_TRANSPOSED"] for row in rows} == {True, False}
    assert {row["flags"]["MANTISSA_BITS"] for row in rows} == {2, 3}
    off_path = [
        f"{_describe(row)}: {row['sass']}"
        for row in rows
        if not row["sass"]["QGMMA"] or row["sass"]["HMMA"]
    ]
    assert not off_path, "\n".join(off_path)


def test_each_k_step_is_promoted_into_the_float32_accumulator(compiled):
    """``max_num_imprecise_acc=BLOCK_K``: the main loop (the largest innermost loop) adds each
    step's fp8 products into the float32 accumulator, at least one ``FADD`` per accumulator
    element of a thread (unpromoted, the wgmma would accumulate in place with none)."""
    rows = _of(compiled, "_scaled_rows_gemm_kernel")
    short = []
    for row in rows:
        tile, warps = row["constexprs"], row["options"]["num_warps"]
        per_thread = tile["BLOCK_M"] * tile["BLOCK_N"] // (32 * warps)
        if row["sass"]["largest_loop"]["fp32_adds"] < per_thread:
            short.append(f"{_describe(row)}: {row['sass']['largest_loop']} < {per_thread}")
    assert not short, "\n".join(short)
