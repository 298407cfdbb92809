"""The expressiveness family: ``python -m benchmarks --quick --only expressiveness`` end to
end, the effective rank, and the plot's absence without matplotlib."""

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_expressiveness as expressiveness

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The output folder and printed text of one quick CPU run of the family."""
    out = tmp_path_factory.mktemp("expressiveness")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--device",
            "cpu",
            "--only",
            "expressiveness",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done.stdout


def test_quick_run_writes_one_row_per_method_and_seed(quick_run):
    out, printed = quick_run
    (path,) = out.glob("expressiveness_*.csv")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["method"], int(row["seed"])) for row in rows] == [
        (method, seed) for seed in expressiveness.SEEDS for method in expressiveness.METHODS
    ]
    task = expressiveness.QUICK
    for row in rows:
        assert int(row["steps"]) == task.steps
        assert float(row["optim_KiB"]) == pytest.approx(2 * 4 * int(row["trainable"]) / 1024)
    trainable = {row["method"]: int(row["trainable"]) for row in rows}
    assert trainable == {
        "lora-r": 2 * task.rank * task.dim,
        "lora-rT": 2 * task.rank * task.cascades * task.dim,
        "lorasc": 2 * task.rank * task.dim,
        "lorasc-paper": 2 * task.rank * task.dim,
        "full": task.dim**2,
    }
    for method in expressiveness.METHODS:
        assert f"\n{method} " in printed
    if importlib.util.find_spec("matplotlib") is not None:
        assert next(out.glob("expressiveness_*.png")).read_bytes()[:4] == b"\x89PNG"


def test_quick_run_shows_lorasc_past_the_rank_limit(quick_run):
    """LoRA of rank r stays at rank r and at the rank-r floor; LoRASC's cascades go past
    both (quick task: rank-8 target, r=2, 4 cascades)."""
    out, _ = quick_run
    with next(out.glob("expressiveness_*.csv")).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    task = expressiveness.QUICK
    for row in rows:
        rank, loss = float(row["eff_rank"]), float(row["rel_loss"])
        if row["method"] == "lora-r":
            assert rank <= task.rank + 1e-3 and loss > task.rank_floor - 0.02
        if row["method"] == "lorasc":
            assert rank > task.rank + 2 and loss < 0.8 * task.rank_floor


def test_effective_rank_of_flat_and_single_spectra():
    u = torch.linalg.qr(torch.randn(20, 6))[0]
    assert expressiveness.effective_rank(3.0 * u @ u.T) == pytest.approx(6.0, rel=1e-5)
    assert expressiveness.effective_rank(torch.outer(torch.randn(9), torch.randn(7))) == (
        pytest.approx(1.0, abs=1e-6)
    )


def test_target_change_has_the_asked_rank_and_norm():
    weight = torch.randn(16, 16)
    change = expressiveness.target_change(weight, 5, torch.Generator().manual_seed(0))
    assert torch.linalg.matrix_rank(change) == 5
    assert float(change.norm()) == pytest.approx(0.5 * float(weight.norm()), rel=1e-5)


def test_plot_is_skipped_with_a_message_without_matplotlib(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ModuleNotFoundError
    assert expressiveness.plot([], expressiveness.QUICK, tmp_path / "x.png", "t") is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "x.png").exists()
