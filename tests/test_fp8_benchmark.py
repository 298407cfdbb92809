"""The fp8 speed benchmark runs on the CPU at its quick size and writes every provider's row."""

import csv

from benchmarks import bench_fp8


def test_quick_cpu_run_writes_linear_and_merge_rows(tmp_path):
    rows = bench_fp8.run(True, "cpu", tmp_path)
    linear = {(row["mode"], row["provider"]) for row in rows if row["op"] == "linear"}
    assert linear == {
        (mode, provider)
        for mode in ("forward", "forward+backward")
        for provider in ("frozen-bf16", "ours-bf16", "ours-fp8")
    }
    merge = {row["provider"]: row for row in rows if row["op"] == "merge"}
    assert set(merge) == {"copy-bf16", "ours-bf16", "ours-fp8"}
    assert all(row["time_ms"] > 0 for row in rows)
    assert all(row["bandwidth_GBps"] > 0 for row in merge.values())
    (written,) = tmp_path.glob("fp8_*.csv")
    with written.open() as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
