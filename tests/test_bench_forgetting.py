"""The forgetting family: ``python -m benchmarks --quick --only forgetting`` end to end (every
run in the CSV, lrs chosen from the grid by validation, pairing by seed, the matched
targets), its data, and the reading of its runs."""

import csv
import dataclasses
import math
import os
from collections import defaultdict

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("scipy")
pytest.importorskip("tqdm")

from benchmarks import bench_forgetting as forgetting  # noqa: E402
from tests.helpers import benchmark_csv  # noqa: E402

PLAN = forgetting.QUICK
ACCURACIES = ["pretrained_a", "val_b", "test_b", "test_a", "matched_val_b", "matched_test_b"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The output folder, columns and rows of the forgetting CSV of one quick CPU run."""
    out = tmp_path_factory.mktemp("forgetting")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    args = ["--quick", "--device", "cpu", "--only", "forgetting"]
    columns, rows, _ = benchmark_csv("benchmarks", args, out, "forgetting_*.csv", env)
    return out, columns, rows


def key(row: dict) -> tuple:
    return (row["setting"], row["method"], int(row["rank"]), int(row["cascades"]))


def test_one_row_per_setting_method_lr_and_seed(quick_run):
    _, columns, rows = quick_run
    assert columns == forgetting.COLUMNS
    expected = sorted(
        (setting, m.kind, m.rank, m.cascades, lr, seed)
        for setting in forgetting.SETTINGS
        for m in PLAN.methods()
        for lr in PLAN.lrs
        for seed in PLAN.seeds
    )
    assert sorted((*key(row), float(row["lr"]), int(row["seed"])) for row in rows) == expected


def test_accuracies_are_fractions_and_matched_points_reach_the_target(quick_run):
    _, _, rows = quick_run
    for row in rows:
        for column in ACCURACIES + ["matched_test_a"]:
            if row[column]:
                assert 0.0 <= float(row[column]) <= 1.0, (column, row)
        target = float(row["target"])
        assert math.isclose(target / 0.05, round(target / 0.05), abs_tol=1e-6)
        if row["chosen"] == "1":  # every method reaches its setting's target at its lr
            assert row["matched_step"] and float(row["matched_val_b"]) >= target - 1e-9
        if row["matched_step"]:
            step = int(row["matched_step"])
            assert 0 <= step <= PLAN.steps and (step % PLAN.eval_every == 0 or step == PLAN.steps)
    targets = defaultdict(set)
    for row in rows:
        targets[row["setting"]].add(row["target"])
    assert all(len(values) == 1 for values in targets.values())


def test_chosen_lr_is_the_grid_lr_of_best_mean_validation_accuracy(quick_run):
    _, _, rows = quick_run
    scores = defaultdict(lambda: defaultdict(list))
    chosen = defaultdict(set)
    for row in rows:
        scores[key(row)][float(row["lr"])].append(float(row["val_b"]))
        if row["chosen"] == "1":
            chosen[key(row)].add(float(row["lr"]))
    assert chosen.keys() == scores.keys()
    for method, by_lr in scores.items():
        (lr,) = chosen[method]  # one lr per method, the same on every seed
        assert lr in PLAN.lrs
        best = max(np.mean(values) for values in by_lr.values())
        assert np.mean(by_lr[lr]) == best
        assert lr == min(x for x, values in by_lr.items() if np.mean(values) == best)


def test_runs_are_paired_by_seed(quick_run):
    """Every method and lr of a seed starts from the same pretrained model."""
    _, _, rows = quick_run
    pretrained = defaultdict(set)
    for row in rows:
        pretrained[row["setting"], row["seed"]].add(row["pretrained_a"])
    assert len(pretrained) == len(forgetting.SETTINGS) * len(PLAN.seeds)
    assert all(len(values) == 1 for values in pretrained.values())


def test_quick_run_writes_the_sweep_report_and_plot(quick_run):
    out, _, _ = quick_run
    (sweep,) = out.glob("lr_sweep_expressiveness_*.csv")
    with sweep.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["method"], float(r["lr"]), int(r["seed"])) for r in rows) == sorted(
        (m, lr, seed)
        for m in forgetting.EXPRESSIVENESS_METHODS
        for lr in PLAN.expressiveness_lrs
        for seed in PLAN.expressiveness_seeds
    )
    assert all(0.0 <= float(r["rel_loss"]) < 10.0 for r in rows)
    (report,) = out.glob("forgetting_*.md")
    text = report.read_text()
    assert all(f"## {setting}" in text for setting in forgetting.SETTINGS)
    assert text.count("| lora-r1 − full | own") == len(forgetting.SETTINGS)
    (png,) = out.glob("forgetting_*.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rotated_task_b_is_task_a_turned():
    pair = forgetting.task_pair("rotated", torch.device("cpu"))
    images_a, labels_a = pair.test_a
    images_b, labels_b = pair.test_b
    assert torch.equal(images_b, torch.rot90(images_a, 1, dims=(1, 2)))
    assert torch.equal(labels_a, labels_b) and pair.shared_head
    classes = forgetting.task_pair("classes", torch.device("cpu"))
    assert not classes.shared_head and classes.classes_a == classes.classes_b == 5


def test_every_method_of_a_seed_starts_from_the_same_model():
    """Step 0 of each method's curve: the same accuracies (pretrained backbone and task-A
    head, task-B head drawn with the seed, LoRA's B = 0)."""
    plan = dataclasses.replace(PLAN, steps=4, eval_every=2)
    pair = forgetting.task_pair("classes", torch.device("cpu"))
    start = forgetting.pretrain(pair, plan, 0, torch.device("cpu"))
    firsts = {
        forgetting.finetune(method, pair, plan, start, 1e-2, 0, torch.device("cpu"))[0]
        for method in plan.methods()
    }
    assert len(firsts) == 1


def run(setting: str, method, lr: float, seed: int, val_b: list[float]):
    curve = [(5 * i, v, v, 1.0 - v) for i, v in enumerate(val_b)]
    return forgetting.Run(setting, method, lr, seed, 1.0, curve)


def test_lr_choice_ties_go_to_the_smaller_lr_and_targets_are_reached_by_all():
    full, lora = forgetting.Method("full"), forgetting.Method("lora", 1)
    runs = [
        run("s", full, 1e-3, 0, [0.1, 0.92]),
        run("s", full, 1e-2, 0, [0.1, 0.92]),
        run("s", lora, 1e-3, 0, [0.1, 0.5, 0.73, 0.6]),
        run("s", lora, 1e-2, 0, [0.1, 0.4, 0.7]),
    ]
    chosen = forgetting.chosen_lrs(runs)
    assert chosen == {("s", full): 1e-3, ("s", lora): 1e-2}
    targets = forgetting.matched_targets(runs, chosen)
    assert targets == {"s": pytest.approx(0.70)}
    assert forgetting.matched_point(runs[3], targets["s"]) == (10, 0.7, 0.7, pytest.approx(0.3))
    assert forgetting.matched_point(runs[3], 0.75) is None
