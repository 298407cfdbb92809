"""The scaling benchmark's quick run: one CSV with every family's rows and columns (no
timing is asserted)."""

import os
from pathlib import Path

from benchmarks import bench_scaling
from tests.helpers import benchmark_csv

ROOT = Path(__file__).resolve().parent.parent
CPU_ENV = {
    **os.environ,
    "CUDA_VISIBLE_DEVICES": "",
    "PYTHONPATH": str(ROOT),
    "OMP_NUM_THREADS": "1",
}


def test_quick_run_writes_every_family(tmp_path):
    columns, rows, stdout = benchmark_csv(
        "benchmarks.bench_scaling", ["--quick", "--reps", "1"], tmp_path, "scaling-*.csv", CPU_ENV
    )
    assert columns == bench_scaling.COLUMNS
    found = [(r["family"], r["variant"], int(r["cascades"]), int(r["layers"])) for r in rows]
    expected = [
        (family, variant, count, 1)
        for count in (2, 6)
        for family, variant in [("boundary_vs_T", v) for v in ("memory", "disk", "full_svd")]
    ]
    expected += [("boundary_vs_L", "memory", 3, layers) for layers in (1, 3)]
    sized = [
        ("merged_state_dict", "whole"),
        ("merged_state_dict", "device"),
        ("save_merged", "shards"),
        ("export_exact", "memory"),
        ("export_rank_k", "memory"),
    ]
    for layers in (1, 3):
        expected += [(family, variant, 3, layers) for family, variant in sized]
        expected.append(("inject_fp8", "bf16->e4m3", 0, layers))
    assert found == expected
    for entry in rows:
        assert float(entry["ms"]) > 0
        peak = entry["peak_MiB"]
        assert (peak == "") == entry["family"].startswith("boundary")
    by_case = {(r["family"], r["variant"], r["layers"]): r for r in rows}
    whole = float(by_case["merged_state_dict", "whole", "3"]["peak_MiB"])
    streamed = float(by_case["save_merged", "shards", "3"]["peak_MiB"])
    assert whole >= 3 * float(by_case["merged_state_dict", "whole", "3"]["model_MiB"]) / 3
    assert streamed < whole  # one merged layer at a time against all three
    assert "wrote" in stdout
