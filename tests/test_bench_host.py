"""The host-cost benchmark (benchmarks/bench_host.py): its counters count exactly, its Triton
stub runs nothing and puts the kernels back, and a run writes one row per provider."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from benchmarks import bench_host, providers
from benchmarks.bench_host import LaunchCounter, OpCounter
from benchmarks.bench_linear import step_fn
from benchmarks.providers import Problem, Tensors
from tests.helpers import benchmark_csv

ROOT = Path(__file__).resolve().parent.parent
CPU_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_op_counter_counts_known_ops_exactly():
    x = torch.ones(4, 4)
    with OpCounter() as ops:
        y = (x + 1).t().sum()
    assert ops.count == 3
    assert ops.names == ["aten.add.Tensor", "aten.t.default", "aten.sum.default"]
    assert ops.views == 1 and ops.host_reads == 0
    assert ops.by_name()["aten.t.default"] == 1
    with OpCounter() as ops:
        y.item()
        bool(x.any())
        x[x > 0]  # a boolean mask: a hidden nonzero
    assert ops.count == 5 and ops.host_reads == 3


def test_op_counter_sees_the_backward():
    w = torch.ones(3, 3, requires_grad=True)
    with OpCounter() as ops:
        (torch.ones(2, 3) @ w).sum().backward()
    assert "aten.mm.default" in ops.names and ops.count > 3


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="no Triton")
def test_launch_stub_counts_runs_nothing_and_restores():
    tensors = Tensors.draw(Problem(16, 32, 16, 4, torch.float32, DEVICE))
    try:
        fn = step_fn("forward+backward", providers.build("ours-triton", tensors), tensors)
    except RuntimeError as error:  # Triton cannot run these tensors here
        pytest.skip(str(error))
    originals = [
        (module, name, getattr(module, name)) for module, name in bench_host.launch_points()
    ]
    with LaunchCounter(stub=True) as launches, OpCounter() as ops:
        fn()
    assert launches.count == 2 == launches.by_kernel["_fused_lowrank_kernel"]  # y and dX
    assert ops.count > 0 and ops.host_reads == 0
    assert all(getattr(module, name) is kernel for module, name, kernel in originals)
    from lorasc_kernels.backends.triton import fused_linear

    with LaunchCounter(stub=True) as launches:  # a real launch would refuse these arguments
        assert fused_linear._fused_lowrank_kernel[(1,)]("not", "a", "launch") is None
    assert launches.count == 1


def test_run_writes_one_row_per_provider(tmp_path):
    columns, found, _ = benchmark_csv(
        "benchmarks.bench_host",
        ["--calls", "10", "--M", "16", "--K", "32", "--N", "16", "--r", "4"],
        tmp_path,
        "host-*.csv",
        CPU_ENV,
    )
    assert columns == bench_host.COLUMNS
    rows = {row["provider"]: row for row in found}
    assert list(rows) == list(bench_host.PROVIDERS)
    assert rows["compile"]["skipped"] and rows["ours-cuda"]["skipped"]  # on the CPU
    measured = [name for name, row in rows.items() if not row["skipped"]]
    assert {"floor", "addmm", "ours-torch"} <= set(measured)
    for name in measured:
        row = rows[name]
        assert float(row["host_us"]) > 0 and int(row["calls"]) == 10
        assert float(row["vs_addmm"]) > 0
        assert int(row["aten_ops"]) > 0 and int(row["view_ops"]) >= 0
        assert int(row["host_read_ops"]) >= 0 and int(row["triton_launches"]) >= 0
        assert row["cuda_syncs"] == ""  # counted on a GPU only
    assert float(rows["addmm"]["vs_addmm"]) == 1.0
    assert int(rows["floor"]["triton_launches"]) == 0
    if "ours-triton" in measured:
        assert int(rows["ours-triton"]["triton_launches"]) > 0
        assert rows["ours-triton"]["launches_stubbed"] == "True"


def test_interleaved_calls_are_timed_in_rotated_turns(monkeypatch):
    """Each round times every function ``reps`` times, the order rotated by one per round;
    the times come back per round."""
    from benchmarks import common

    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in "abc"}
    clock = iter(range(1000))
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    times = common.time_interleaved_calls_ms(fns, rounds=3, reps=2, warmup=1)
    assert order[:3] == ["a", "b", "c"]  # warm-up, once each
    assert order[3:] == [*"aabbcc", *"bbccaa", *"ccaabb"]
    assert {name: [len(calls) for calls in by_round] for name, by_round in times.items()} == {
        name: [2, 2, 2] for name in "abc"
    }
    assert all(value == 1e3 for by_round in times.values() for calls in by_round for value in calls)


def test_paired_ratio_is_the_median_of_the_rounds_ratios():
    """A slower machine in one round moves both sides of that round's ratio alike."""
    from benchmarks.common import paired_ratio

    ours = [[2.0, 2.2, 1.8], [4.0, 4.0, 4.0], [3.0, 9.0, 3.0]]
    base = [[2.0, 2.0, 2.0], [5.0, 5.0, 5.0], [1.0, 1.0, 1.0]]
    assert paired_ratio(ours, base) == 1.0  # rounds: 1.0, 0.8, 3.0
    assert paired_ratio(base, base) == 1.0
    with pytest.raises(ValueError):
        paired_ratio(ours, base[:2])
