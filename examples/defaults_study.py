"""The study behind ``Cascade``'s defaults: LoRASC settings on three tasks, paired by seed.

Tasks (each seed draws the same data, shots and initial weights for every setting):

* ``synthetic`` (rank-limited): the expressiveness benchmark's task
  (``benchmarks/bench_expressiveness.py``: a rank-32 change of a 64×64 layer, r=4, 16
  cascades); score: held-out loss / the untouched model's (lower is better);
* ``distill`` (rank-limited): the main job's teacher distilled into rank-1 adapters on
  the digits, in the variant this study ran: from the pretrained backbone with a new,
  trained head, 30 epochs (6 cascades of 5); score: clean and OOD accuracy;
* ``fewshot`` (not rank-limited): the main job's 16-shot fine-tuning, rank 4; same scores.

Settings: ``slow_rate`` × ``noise_lambda`` (``slow_other_params`` on), the slow update of the
head off (``others-off``), the head's Adam moments dropped at each boundary instead of kept
(``others-reset``), and a per-cascade warm-up (``warmup``); plain LoRA as the baseline.
Each line of the table is mean ± std over seeds, and the paired difference (same seed)
to the paper's settings (slow_rate 0.5, noise_lambda 0.15). Writes ``<out>.csv`` and
``<out>.md``.

    python examples/defaults_study.py --tasks synthetic,fewshot,distill --seeds 5
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import finetune_digits as digits
import numpy as np
import torch

sys.path.insert(0, str(digits.HERE.parent))  # the repository root, for the benchmarks package
from benchmarks import bench_expressiveness as expressiveness  # noqa: E402
from lorasc_kernels import Cascade  # noqa: E402

TASKS = ("synthetic", "distill", "fewshot")
PAPER = "slow0.5-noise0.15"
# The distillation variant of the study (the main job's students keep the teacher's head).
STUDY_DISTILL = dataclasses.replace(digits.DISTILL, epochs=30, train_head=True)


@dataclasses.dataclass(frozen=True)
class Setting:
    """A LoRASC setting of the study (``method="lora"``: the plain LoRA baseline)."""

    name: str
    method: str = "lorasc"
    slow_rate: float = 0.5
    noise_lambda: float = 0.15
    slow_other_params: bool = True
    reset_other_state: bool = False
    warmup_cascade_fraction: float = 0.0

    def cascade_kwargs(self, steps_per_cascade: int) -> dict:
        return {
            "slow_rate": self.slow_rate,
            "noise_lambda": self.noise_lambda,
            "slow_other_params": self.slow_other_params,
            "warmup_steps": round(self.warmup_cascade_fraction * steps_per_cascade),
        }


def grid() -> list[Setting]:
    settings = [Setting("lora", method="lora")]
    for slow in (0.5, 0.8, 1.0):
        for noise in (0.0, 0.15):
            settings.append(Setting(f"slow{slow}-noise{noise}", slow_rate=slow, noise_lambda=noise))
    for slow in (0.5, 0.8):
        settings.append(Setting(f"slow{slow}-others-off", slow_rate=slow, slow_other_params=False))
        settings.append(Setting(f"slow{slow}-others-reset", slow_rate=slow, reset_other_state=True))
    for slow in (0.8, 1.0):
        settings.append(Setting(f"slow{slow}-warmup", slow_rate=slow, warmup_cascade_fraction=0.1))
    return settings


class DropOtherState:
    """While active, each boundary's slow update also drops the other parameters' optimizer
    state (the ``others-reset`` variant; the library keeps it)."""

    def __enter__(self):
        self.original = Cascade._slow_update_other_params

        def update_and_drop(cascade):
            self.original(cascade)
            for parameter in cascade.slow_update.params:
                cascade.optimizer.state.pop(parameter, None)

        Cascade._slow_update_other_params = update_and_drop
        return self

    def __exit__(self, *exc):
        Cascade._slow_update_other_params = self.original


def run_synthetic(setting: Setting, seed: int) -> dict:
    task = expressiveness.Task()
    if setting.method == "lora":
        row = expressiveness.train("lora-r", task, seed)
    else:
        row = expressiveness.train(
            "lorasc", task, seed, **setting.cascade_kwargs(task.steps_per_cascade)
        )
    return {"rel_loss": row["rel_loss"]}


class DigitsTasks:
    """The pretrained backbone, data and teacher of the two digits tasks, built once."""

    def __init__(self, cache: Path):
        self.device = torch.device("cpu")
        self.pretrain = digits.PretrainSettings()
        self.pretrained = digits.pretrain(self.pretrain, cache, self.device)
        self.pool, test = digits.load_split(digits.FINETUNE_CLASSES)
        self.sets = digits.evaluation_sets(test, self.device)
        self._distill_split = None

    def split(self, task: str, seed: int) -> digits.Split:
        if task == "fewshot":
            return digits.few_shots(self.pool, digits.FEWSHOT.shots, seed)
        if self._distill_split is None:
            self._distill_split, _ = digits.distillation(
                self.pretrained,
                self.pool,
                self.sets,
                digits.TEACHER,
                self.pretrain.shape,
                self.device,
            )
        return self._distill_split

    def run(self, task: str, setting: Setting, seed: int) -> dict:
        base = digits.FEWSHOT if task == "fewshot" else STUDY_DISTILL
        train = self.split(task, seed)
        steps_per_cascade = base.epochs_per_cascade * -(-len(train.labels) // base.batch_size)
        kwargs = setting.cascade_kwargs(steps_per_cascade)
        settings = dataclasses.replace(base, backend="torch", **kwargs)
        with DropOtherState() if setting.reset_other_state else nullcontext():
            result, _ = digits.finetune(
                setting.method,
                seed,
                digits.without_head(self.pretrained),
                train,
                self.sets,
                settings,
                self.pretrain.shape,
                self.device,
            )
        return {"clean": result.clean, "ood": result.ood}


def table(rows: list[dict], task: str) -> str:
    """Markdown: per setting, mean ± std of each score and the paired difference to PAPER."""
    rows = [row for row in rows if row["task"] == task]
    scores = ["rel_loss"] if task == "synthetic" else ["clean", "ood"]
    by = {(row["setting"], row["seed"]): row for row in rows}
    names = list(dict.fromkeys(row["setting"] for row in rows))
    header = " | ".join(f"{s} | {s} − paper" for s in scores)
    lines = [f"| setting | {header} |", "|---" * (1 + 2 * len(scores)) + "|"]
    for name in names:
        seeds = sorted(seed for (setting, seed) in by if setting == name)
        cells = []
        for score in scores:
            values = np.array([by[name, s][score] for s in seeds])
            gaps = np.array(
                [by[name, s][score] - by[PAPER, s][score] for s in seeds if (PAPER, s) in by]
            )
            digits_ = 4 if score == "rel_loss" else 3
            cells.append(f"{values.mean():.{digits_}f} ± {values.std():.{digits_}f}")
            cells.append(
                f"{gaps.mean():+.{digits_}f} ± {gaps.std():.{digits_}f}" if len(gaps) else ""
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return f"**{task}** ({len({row['seed'] for row in rows})} seeds)\n\n" + "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"among {','.join(TASKS)}")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--settings", help="comma-separated setting names (default: all)")
    parser.add_argument("--out", type=Path, default=digits.HERE / "results" / "defaults_study")
    parser.add_argument("--cache", type=Path, default=digits.HERE / ".cache")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = grid()
    if args.settings:
        settings = [s for s in settings if s.name in args.settings.split(",")]
    tasks = args.tasks.split(",")
    digits_tasks = DigitsTasks(args.cache) if set(tasks) - {"synthetic"} else None
    rows, started = [], time.perf_counter()
    for task in tasks:
        for seed in range(args.seeds):
            for setting in settings:
                if task == "synthetic" and (
                    not setting.slow_other_params or setting.reset_other_state
                ):
                    continue  # no other trained parameter in the synthetic task
                if task == "synthetic":
                    scores = run_synthetic(setting, seed)
                else:
                    scores = digits_tasks.run(task, setting, seed)
                rows.append({"task": task, "setting": setting.name, "seed": seed, **scores})
                print(task, setting.name, seed, scores, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["task", "setting", "seed", "rel_loss", "clean", "ood"]
    with args.out.with_suffix(".csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    machine = (
        f"{time.strftime('%Y-%m-%d', time.gmtime())}, torch {torch.__version__}, "
        f"1 thread, torch backend, {time.perf_counter() - started:.0f} s"
    )
    text = "\n\n".join(table(rows, task) for task in tasks)
    args.out.with_suffix(".md").write_text(f"{machine}\n\n{text}\n")
    print(f"\n{machine}\n\n{text}")


if __name__ == "__main__":
    main()
