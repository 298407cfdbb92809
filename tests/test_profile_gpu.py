"""The GPU profile (benchmarks/profile_gpu.py) dry-runs on the CPU: one CSV with every
provider × mode × problem row and every merge row, its columns, and no failed row."""

import itertools
import os
from pathlib import Path

import pytest

pytest.importorskip("triton")

from benchmarks import profile_gpu  # noqa: E402
from tests.helpers import benchmark_csv  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# CUDA hidden: the script takes its dry path even on a GPU machine. TRITON_INTERPRET left
# out: the script sets it itself, before Triton is imported (as `--dry` on a GPU needs).
CPU_ENV = {
    **{key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"},
    "CUDA_VISIBLE_DEVICES": "",
    "PYTHONPATH": str(ROOT),
}
PROBLEMS = ("64x32x48 r4 bf16", "64x32x48 r4 fp16")
MERGES = [
    f"merge {size}x{size} r16 {weight_format}"
    for size, weight_format in itertools.product((16, 32), profile_gpu.MERGE_FORMATS)
]


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    """``(header, rows, stdout)`` of one dry run."""
    out = tmp_path_factory.mktemp("profile")
    return benchmark_csv(
        "benchmarks.profile_gpu", ["--dry"], out, "profile-*.csv", CPU_ENV, timeout=600
    )


def test_header_is_the_documented_columns(profile):
    header, rows, _ = profile
    assert header == profile_gpu.COLUMNS
    for row in rows:
        assert row["torch"] and row["triton"] and row["device"] and row["triton_config"]


def test_every_provider_mode_and_problem_has_one_row(profile):
    _, rows, _ = profile
    linear = [(r["problem"], r["provider"], r["mode"]) for r in rows if r["family"] == "linear"]
    expected = list(itertools.product(PROBLEMS, profile_gpu.PROVIDERS, profile_gpu.MODES))
    assert sorted(linear) == sorted(expected)


def test_linear_rows_are_measured_and_graphs_say_why_not(profile):
    _, rows, _ = profile
    for row in (r for r in rows if r["family"] == "linear"):
        where = f"{row['problem']} {row['provider']} {row['mode']}"
        if row["provider"] == profile_gpu.GRAPH:
            assert row["error"].startswith("no graph: CUDA graphs need"), where
            continue
        assert row["error"] == "", where
        assert float(row["bench_ms"]) > 0 and float(row["host_ms"]) > 0, where
        if row["provider"] == "floor":
            assert float(row["vs_floor"]) == 1.0
        else:
            assert float(row["vs_floor"]) > 0, where
        expected_variant = {"ours-triton@tiled": "tiled", "ours-triton@persistent": "persistent"}
        if row["provider"].startswith("ours-"):
            assert row["variant"] == expected_variant.get(row["provider"], "dispatch"), where


def test_merge_rows(profile):
    _, rows, _ = profile
    merges = [(r["problem"], r["provider"]) for r in rows if r["family"] == "merge"]
    assert sorted(merges) == sorted(itertools.product(MERGES, profile_gpu.MERGE_PROVIDERS))
    for row in (r for r in rows if r["family"] == "merge"):
        assert row["error"] == "", row
        assert float(row["bench_ms"]) > 0 and float(row["host_ms"]) > 0
        assert float(row["bandwidth_GBps"]) > 0 and float(row["bandwidth_vs_copy"]) > 0


def test_no_failure_and_no_gpu_figures_on_the_cpu(profile):
    _, rows, stdout = profile
    assert "FAILED" not in stdout
    assert all(not row["error"].startswith("failed") for row in rows)
    assert all(row["gpu_busy_ms"] == "" and row["syncs_per_call"] == "" for row in rows)


def test_a_spent_budget_skips_every_row_and_keeps_them(tmp_path):
    _, rows, _ = benchmark_csv(
        "benchmarks.profile_gpu", ["--dry", "--budget-s", "0"], tmp_path, "profile-*.csv", CPU_ENV
    )
    linear = len(PROBLEMS) * len(profile_gpu.PROVIDERS) * len(profile_gpu.MODES)
    assert len(rows) == linear + len(MERGES) * len(profile_gpu.MERGE_PROVIDERS)
    assert all(row["error"] == "skipped: budget spent" for row in rows)
