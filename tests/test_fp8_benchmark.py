"""The fp8 benchmarks run on the CPU at their quick size and write every row: the speed one (every
provider) and the compute mode's precision (every layer)."""

import csv

from benchmarks import bench_fp8, fp8_compute_precision


def test_quick_cpu_run_writes_linear_and_merge_rows(tmp_path):
    rows = bench_fp8.run(True, "cpu", tmp_path)
    linear = {(row["mode"], row["provider"]) for row in rows if row["op"] == "linear"}
    providers = ("frozen-bf16", "ours-bf16", "ours-fp8", "ours-fp8-compute")
    assert linear == {
        (mode, provider) for mode in ("forward", "forward+backward") for provider in providers
    } | {("forward", "scaled-mm-rowwise")}
    merge = {row["provider"]: row for row in rows if row["op"] == "merge"}
    assert set(merge) == {"copy-bf16", "ours-bf16", "ours-fp8"}
    assert all(row["time_ms"] > 0 for row in rows)
    assert all(row["bandwidth_GBps"] > 0 for row in merge.values())
    (written,) = tmp_path.glob("fp8_*.csv")
    with written.open() as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)


def test_compute_precision_quick_cpu_run_writes_every_layer(tmp_path):
    """Every random layer and the 12 digits linears; the compute mode really quantizes (a
    percent-level difference from the storage mode, which is float32-exact on float32 data)."""
    rows = fp8_compute_precision.run(True, "cpu", tmp_path)
    layers = [row["layer"] for row in rows]
    assert sum(layer.startswith("random") for layer in layers) == 4
    assert sum(layer.startswith("digits") for layer in layers) == 12
    for row in rows:
        assert 1e-3 < row["rel_y"] < 0.1 and 1e-3 < row["rel_dx"] < 0.1, row
        assert row["y_compute_vs_exact"] > row["y_storage_vs_exact"], row
        if row["dtype"] == "float32":
            assert row["y_storage_vs_exact"] < 1e-5 and row["dx_storage_vs_exact"] < 1e-5, row
    (written,) = tmp_path.glob("fp8_compute_precision_*.csv")
    with written.open() as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
