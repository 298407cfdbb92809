"""Forgetting: learn task B, keep task A, with full fine-tuning, LoRA and LoRASC.

An MLP (8×8 image → fc1 → GELU → fc2 → GELU → head) is pretrained on task A of
scikit-learn's bundled digits, then fine-tuned on task B. Two settings, both offline:

* ``classes`` (class-incremental): A = digits 0–4, B = digits 5–9 with a new head; task A
  is measured with its own head (kept as pretrained) on the fine-tuned backbone;
* ``rotated`` (domain shift): A = the ten digits upright, B = the same digits turned by
  90°; one head, trained on B; task A is measured with the fine-tuned model as it is.

Methods: ``full`` (every weight on B's path), ``lora`` (``inject_lorasc`` into fc1 and fc2,
rank r, the head trained), ``lorasc`` (the same plus a ``Cascade`` with its defaults, T
cascades), ``lorasc-paper`` (the paper's ``slow_rate=0.5, noise_lambda=0.15``) and
``lorasc-warmup`` (defaults plus a per-cascade warm-up of 10% of a cascade), r ∈ {1, 4},
T ∈ {4, 8}. Adam, cosine decay over a fixed number of steps. Every method runs at every
learning rate of one shared grid on every seed; its lr is the one with the best mean
task-B validation accuracy at the end. A seed fixes the pretrained model, the new head,
the first LoRA and the batch order for every method, so comparisons are paired by seed.

Along training (every ``eval_every`` steps, LoRASC through ``merged_state_dict``, the
model ``finalize()`` would return) the benchmark records task-B validation and test
accuracy and task-A test accuracy. Matched accuracy: per setting and rank, the target is
the highest multiple of 0.05 that every chosen run reaches on B's validation data; each run
is read at the first point it reaches it (early stopping at a common target).

The expressiveness benchmark's task is swept over learning rates too (3 seeds), for the
learning-rate guidance. Writes ``forgetting_<machine>.csv`` (every run),
``lr_sweep_expressiveness_<machine>.csv``, ``forgetting_<machine>.md`` (the tables)
and ``forgetting_<machine>.png`` (task-B accuracy against task-A accuracy along training).

Usage: ``python -m benchmarks --only forgetting --threads 1 [--quick]``.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F

from benchmarks import bench_expressiveness as expressiveness
from benchmarks.common import device_name, example_module, family_main
from lorasc_kernels import Cascade, LoRASCConfig, inject_lorasc
from lorasc_kernels._files import atomic_write

SETTINGS = ("classes", "rotated")
PAPER = {"slow_rate": 0.5, "noise_lambda": 0.15}
WARMUP_FRACTION = 0.1  # of a cascade, for lorasc-warmup
TARGET_STEP = 0.05  # matched targets are multiples of this
COLUMNS = [
    "setting",
    "method",
    "rank",
    "cascades",
    "lr",
    "seed",
    "chosen",
    "pretrained_a",
    "val_b",
    "test_b",
    "test_a",
    "target",
    "matched_step",
    "matched_val_b",
    "matched_test_b",
    "matched_test_a",
]


digits = example_module("finetune_digits")  # its data split, batches and accuracy


# -- what is run -------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A fine-tuning method: ``kind`` among full, lora, lorasc, lorasc-paper, lorasc-warmup,
    its rank r and its number of cascades T (0 where they do not apply)."""

    kind: str
    rank: int = 0
    cascades: int = 0

    @property
    def name(self) -> str:
        parts = [self.kind] + [f"r{self.rank}"] * bool(self.rank)
        return "-".join(parts + [f"T{self.cascades}"] * bool(self.cascades))

    def cascade_settings(self, steps_per_cascade: int) -> dict:
        """Keyword arguments of ``Cascade`` beyond the steps and the seed."""
        if self.kind == "lorasc-paper":
            return dict(PAPER)
        if self.kind == "lorasc-warmup":
            return {"warmup_steps": max(1, round(WARMUP_FRACTION * steps_per_cascade))}
        return {}


@dataclass(frozen=True)
class Plan:
    """Sizes of the benchmark: model, pretraining, fine-tuning, grid and seeds."""

    hidden: int = 128
    pretrain_epochs: int = 30
    pretrain_lr: float = 3e-3
    steps: int = 480
    batch: int = 32
    eval_every: int = 5
    ranks: tuple[int, ...] = (1, 4)
    cascades: tuple[int, ...] = (4, 8)
    lrs: tuple[float, ...] = (5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    expressiveness_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    expressiveness_seeds: tuple[int, ...] = (0, 1, 2)

    def methods(self) -> list[Method]:
        chosen = [Method("full")]
        for rank in self.ranks:
            chosen.append(Method("lora", rank))
            for kind in ("lorasc", "lorasc-paper", "lorasc-warmup"):
                chosen += [Method(kind, rank, cascades) for cascades in self.cascades]
        return chosen


QUICK = Plan(
    hidden=32,
    pretrain_epochs=3,
    steps=24,
    eval_every=6,
    ranks=(1,),
    cascades=(2,),
    lrs=(3e-3, 1e-2),
    seeds=(0, 1),
    expressiveness_lrs=(3e-3, 1e-2),
    expressiveness_seeds=(0,),
)


# -- data and model ----------------------------------------------------------------------


@dataclass
class TaskPair:
    """Task A (pretraining) and task B (fine-tuning) of a setting, as device tensors."""

    train_a: tuple
    test_a: tuple
    train_b: tuple
    val_b: tuple
    test_b: tuple
    classes_a: int
    classes_b: int
    shared_head: bool


def validation_split(split, fraction: float = 1 / 3):
    """``split`` cut into a training part and a stratified validation part (fixed)."""
    train_x, val_x, train_y, val_y = train_test_split(
        split.images, split.labels, test_size=fraction, stratify=split.labels, random_state=0
    )
    return digits.Split(train_x, train_y), digits.Split(val_x, val_y)


def rotated(split):
    """``split`` with every image turned by 90°."""
    return digits.Split(np.ascontiguousarray(np.rot90(split.images, axes=(1, 2))), split.labels)


def task_pair(setting: str, device: torch.device) -> TaskPair:
    """The data of ``setting`` (see the module docstring)."""
    if setting == "classes":
        train_a, test_a = digits.load_split(digits.PRETRAIN_CLASSES)
        pool_b, test_b = digits.load_split(digits.FINETUNE_CLASSES)
        classes, shared = len(digits.FINETUNE_CLASSES), False
    elif setting == "rotated":
        train_a, test_a = digits.load_split(tuple(range(10)))
        pool_b, test_b = rotated(train_a), rotated(test_a)
        classes, shared = 10, True
    else:
        raise ValueError(f"unknown setting {setting!r}; expected one of {SETTINGS}")
    train_b, val_b = validation_split(pool_b)
    tensors = [digits.as_tensors(s, device) for s in (train_a, test_a, train_b, val_b, test_b)]
    return TaskPair(*tensors, len(np.unique(train_a.labels)), classes, shared)


class TwoTaskMLP(nn.Module):
    """A backbone (fc1, fc2) with a head per task; ``forward`` is task B's model. With
    ``shared_head`` both tasks use one head."""

    def __init__(self, hidden: int, classes_a: int, classes_b: int, shared_head: bool):
        super().__init__()
        self.backbone = nn.Sequential()
        self.backbone.add_module("flatten", nn.Flatten())
        self.backbone.add_module("fc1", nn.Linear(64, hidden))
        self.backbone.add_module("act1", nn.GELU())
        self.backbone.add_module("fc2", nn.Linear(hidden, hidden))
        self.backbone.add_module("act2", nn.GELU())
        self.head_a = nn.Linear(hidden, classes_a)
        self.head_b = self.head_a if shared_head else nn.Linear(hidden, classes_b)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head_b(self.backbone(images))

    def task_a(self) -> nn.Module:
        """Task A's model, sharing this one's modules."""
        return nn.Sequential(self.backbone, self.head_a)


def new_model(pair: TaskPair, plan: Plan, device: torch.device) -> TwoTaskMLP:
    return TwoTaskMLP(plan.hidden, pair.classes_a, pair.classes_b, pair.shared_head).to(device)


# -- training ----------------------------------------------------------------------------


def pretrain(pair: TaskPair, plan: Plan, seed: int, device: torch.device) -> dict:
    """Backbone and task A's head trained on task A (Adam); the state dict."""
    torch.manual_seed(seed)
    model = new_model(pair, plan, device)
    task_a = model.task_a()
    optimizer = torch.optim.Adam(task_a.parameters(), lr=plan.pretrain_lr)
    images, labels = pair.train_a
    generator = torch.Generator().manual_seed(seed)
    for _ in range(plan.pretrain_epochs):
        for index in digits.batches(len(labels), plan.batch, generator):
            loss = F.cross_entropy(task_a(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def prepared(
    method: Method, pair: TaskPair, plan: Plan, start: dict, seed: int, device: torch.device
) -> TwoTaskMLP:
    """The pretrained model (task B's head new unless shared, drawn with ``seed``) made
    ready for ``method``: LoRA adapters on fc1 and fc2 and B's head trainable, or, for
    ``full``, every weight on B's path."""
    torch.manual_seed(seed)
    model = new_model(pair, plan, device)
    kept = {k: v for k, v in start.items() if pair.shared_head or not k.startswith("head_b.")}
    model.load_state_dict(kept, strict=pair.shared_head)
    if method.kind == "full":
        model.head_a.requires_grad_(pair.shared_head)
        return model
    config = LoRASCConfig(
        r=method.rank, lora_alpha=2 * method.rank, target_modules=["fc1", "fc2"], backend="torch"
    )
    inject_lorasc(model, config)
    model.head_b.requires_grad_(True)
    return model


@dataclass
class Run:
    """One method at one lr on one seed: its curve of (step, val B, test B, test A)."""

    setting: str
    method: Method
    lr: float
    seed: int
    pretrained_a: float
    curve: list[tuple[int, float, float, float]]

    @property
    def final(self) -> tuple[int, float, float, float]:
        return self.curve[-1]


def evaluate(model: TwoTaskMLP, view: TwoTaskMLP, cascade, pair: TaskPair) -> tuple:
    """(val B, test B, test A) accuracies of ``model``; under a cascade, of the model its
    ``finalize()`` would return now (loaded into ``view``)."""
    if cascade is not None:
        view.load_state_dict(cascade.merged_state_dict())
        model = view
    return (
        digits.accuracy(model, *pair.val_b),
        digits.accuracy(model, *pair.test_b),
        digits.accuracy(model.task_a(), *pair.test_a),
    )


def finetune(
    method: Method,
    pair: TaskPair,
    plan: Plan,
    start: dict,
    lr: float,
    seed: int,
    device: torch.device,
) -> list[tuple[int, float, float, float]]:
    """Train ``method`` on task B from ``start``; the curve (see :class:`Run`)."""
    model = prepared(method, pair, plan, start, seed, device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)

    def cosine(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * step / plan.steps))

    cascade, schedule = None, cosine
    if method.cascades:
        per_cascade = plan.steps // method.cascades
        settings = method.cascade_settings(per_cascade)
        cascade = Cascade(model, optimizer, steps_per_cascade=per_cascade, seed=seed, **settings)
        schedule = cascade.lr_lambda(cosine)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    view = new_model(pair, plan, device)
    images, labels = pair.train_b
    generator = torch.Generator().manual_seed(seed)
    curve = [(0, *evaluate(model, view, cascade, pair))]
    order = iter(())
    for step in range(1, plan.steps + 1):
        index = next(order, None)
        if index is None:
            order = iter(digits.batches(len(labels), plan.batch, generator))
            index = next(order)
        loss = F.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if cascade is not None:
            cascade.step()
        scheduler.step()
        if step % plan.eval_every == 0 or step == plan.steps:
            curve.append((step, *evaluate(model, view, cascade, pair)))
    return curve


def run_setting(setting: str, plan: Plan, device: torch.device) -> list[Run]:
    """Every method at every lr on every seed of ``setting``."""
    pair = task_pair(setting, device)
    runs = []
    for seed in plan.seeds:
        start = pretrain(pair, plan, seed, device)
        view = new_model(pair, plan, device)
        view.load_state_dict(start)
        pretrained_a = digits.accuracy(view.task_a(), *pair.test_a)
        for method in plan.methods():
            for lr in plan.lrs:
                curve = finetune(method, pair, plan, start, lr, seed, device)
                runs.append(Run(setting, method, lr, seed, pretrained_a, curve))
            print(f"{setting} seed {seed} {method.name}: done", flush=True)
    return runs


# -- reading the runs --------------------------------------------------------------------


def chosen_lrs(runs: list[Run]) -> dict[tuple[str, Method], float]:
    """Per (setting, method): the lr of the best mean final task-B validation accuracy over
    seeds (ties: the smaller lr)."""
    scores: dict[tuple[str, Method], dict[float, list[float]]] = {}
    for run in runs:
        scores.setdefault((run.setting, run.method), {}).setdefault(run.lr, []).append(run.final[1])
    return {
        key: max(sorted(by_lr), key=lambda lr, by_lr=by_lr: np.mean(by_lr[lr]))
        for key, by_lr in scores.items()
    }


def matched_targets(runs: list[Run], chosen: dict) -> dict[str, float]:
    """Per setting: the highest multiple of TARGET_STEP that every method reaches on task
    B's validation data at its chosen lr, on every seed."""
    reached: dict[str, float] = {}
    for run in runs:
        if run.lr == chosen[run.setting, run.method]:
            best = max(point[1] for point in run.curve)
            reached[run.setting] = min(reached.get(run.setting, 1.0), best)
    return {
        setting: math.floor(value / TARGET_STEP + 1e-9) * TARGET_STEP
        for setting, value in reached.items()
    }


def matched_point(run: Run, target: float) -> tuple | None:
    """The first point of ``run`` with task-B validation accuracy ≥ ``target``."""
    return next((point for point in run.curve if point[1] >= target - 1e-9), None)


def csv_rows(runs: list[Run], chosen: dict, targets: dict) -> list[dict]:
    """One row per run (matched columns blank where the run never reached the target)."""
    rows = []
    for run in runs:
        target = targets[run.setting]
        point = matched_point(run, target)
        _, val_b, test_b, test_a = run.final
        rows.append(
            {
                "setting": run.setting,
                "method": run.method.kind,
                "rank": run.method.rank,
                "cascades": run.method.cascades,
                "lr": run.lr,
                "seed": run.seed,
                "chosen": int(run.lr == chosen[run.setting, run.method]),
                "pretrained_a": round(run.pretrained_a, 4),
                "val_b": round(val_b, 4),
                "test_b": round(test_b, 4),
                "test_a": round(test_a, 4),
                "target": round(target, 2),
                **dict(
                    zip(
                        COLUMNS[-4:],
                        ("", "", "", "") if point is None else (point[0], *map(_r4, point[1:])),
                        strict=True,
                    )
                ),
            }
        )
    return rows


def _r4(value: float) -> float:
    return round(value, 4)


def write_csv(rows: list[dict], path: Path) -> None:
    """``rows`` to the CSV at ``path``, written whole (atomically)."""

    def write(temporary: Path) -> None:
        with temporary.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


# -- tables ------------------------------------------------------------------------------


def by_key(runs: list[Run]) -> dict[tuple, Run]:
    """``runs`` keyed by (setting, method, lr, seed)."""
    return {(run.setting, run.method, run.lr, run.seed): run for run in runs}


def scores(run: Run, target: float) -> dict[str, float]:
    """Final task-B test and task-A accuracy, and task-A accuracy at the matched point (NaN
    where the run never reaches ``target``)."""
    point = matched_point(run, target)
    return {
        "B": run.final[2],
        "A": run.final[3],
        "A matched": math.nan if point is None else point[3],
    }


def mean_std(values, signed: bool = False) -> str:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if not len(values):
        return "not reached"
    sign = "+" if signed else ""
    return f"{values.mean():{sign}.3f} ± {values.std():.3f}"


def paired(a: list[dict], b: list[dict], score: str) -> str:
    """``a − b`` of ``score`` per seed: mean ± std and the seeds with ``a − b > 0``."""
    gaps = np.array([x[score] - y[score] for x, y in zip(a, b, strict=True)])
    gaps = gaps[~np.isnan(gaps)]
    if not len(gaps):
        return "not reached"
    return f"{mean_std(gaps, signed=True)} ({int((gaps > 0).sum())}/{len(gaps)})"


def methods_of(runs: list[Run], setting: str) -> list[Method]:
    return list(dict.fromkeys(run.method for run in runs if run.setting == setting))


def results_table(runs: list[Run], chosen: dict, target: float, setting: str) -> str:
    """Markdown, one row per method at its chosen lr: mean ± std over seeds, at the end and
    at the first point task-B validation accuracy reaches ``target``."""
    index = by_key(runs)
    seeds = sorted({run.seed for run in runs})
    lines = [
        "| method | lr | val B | test B | test A | step, matched | test B, matched "
        "| test A, matched |",
        "|---" * 8 + "|",
    ]
    for method in methods_of(runs, setting):
        lr = chosen[setting, method]
        mine = [index[setting, method, lr, seed] for seed in seeds]
        matched = [matched_point(run, target) for run in mine]  # reached at the chosen lr
        steps = np.array([point[0] for point in matched])
        lines.append(
            f"| {method.name} | {lr:g} | {mean_std([r.final[1] for r in mine])} "
            f"| {mean_std([r.final[2] for r in mine])} | {mean_std([r.final[3] for r in mine])} "
            f"| {steps.mean():.0f} ± {steps.std():.0f} | {mean_std([p[2] for p in matched])} "
            f"| {mean_std([p[3] for p in matched])} |"
        )
    return "\n".join(lines)


def comparisons(runs: list[Run], setting: str) -> list[tuple[Method, Method, bool]]:
    """(a, b, at b's lr) pairs of ``setting``: LoRA − full; each LoRASC − LoRA and − full
    at their chosen lrs; each LoRASC − LoRA both at LoRA's lr."""
    methods = methods_of(runs, setting)
    full = Method("full")
    pairs = []
    for rank in sorted({m.rank for m in methods} - {0}):
        lora = Method("lora", rank)
        pairs.append((lora, full, False))
        cascaded = [m for m in methods if m.rank == rank and m.cascades]
        pairs += [(m, b, False) for m in cascaded for b in (lora, full)]
        pairs += [(m, lora, True) for m in cascaded]
    return pairs


def paired_table(runs: list[Run], chosen: dict, target: float, setting: str) -> str:
    """Markdown: paired differences ``a − b`` by seed (mean ± std, seeds with a − b > 0)."""
    index = by_key(runs)
    seeds = sorted({run.seed for run in runs})
    lines = [
        "| a − b | lr of a | test B | test A | test A at matched B |",
        "|---|---|---|---|---|",
    ]
    for a, b, same_lr in comparisons(runs, setting):
        lr_b = chosen[setting, b]
        lr_a = lr_b if same_lr else chosen[setting, a]
        left = [scores(index[setting, a, lr_a, seed], target) for seed in seeds]
        right = [scores(index[setting, b, lr_b, seed], target) for seed in seeds]
        cells = " | ".join(paired(left, right, score) for score in ("B", "A", "A matched"))
        lines.append(f"| {a.name} − {b.name} | {'b' if same_lr else 'own'} ({lr_a:g}) | {cells} |")
    return "\n".join(lines)


def sweep_table(runs: list[Run], chosen: dict, setting: str) -> str:
    """Markdown: mean final task-B validation accuracy of each method at each lr (the chosen
    one in bold), and the chosen lr over LoRA's of the same rank."""
    lrs = sorted({run.lr for run in runs})
    means: dict[tuple[Method, float], list[float]] = {}
    for run in runs:
        if run.setting == setting:
            means.setdefault((run.method, run.lr), []).append(run.final[1])
    lines = [
        "| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " | lr / LoRA's |",
        "|---" * (len(lrs) + 2) + "|",
    ]
    for method in methods_of(runs, setting):
        best = chosen[setting, method]
        cells = [
            (
                f"**{np.mean(means[method, lr]):.3f}**"
                if lr == best
                else f"{np.mean(means[method, lr]):.3f}"
            )
            for lr in lrs
        ]
        ratio = best / chosen[setting, Method("lora", method.rank)] if method.rank else math.nan
        lines.append(f"| {method.name} | " + " | ".join(cells) + f" | {ratio:.3g} |")
    return "\n".join(lines)


# -- the expressiveness task over learning rates -----------------------------------------

EXPRESSIVENESS_METHODS = ("lora-r", "lora-rT", "lorasc", "lorasc-paper", "lorasc-warmup")


def expressiveness_sweep(plan: Plan, quick: bool, device: str) -> list[dict]:
    """Held-out loss of the expressiveness task per method, lr and seed (``lorasc-warmup``:
    the defaults with a warm-up of 10% of a cascade)."""
    base = expressiveness.QUICK if quick else expressiveness.Task()
    warmup = {"warmup_steps": max(1, round(WARMUP_FRACTION * base.steps_per_cascade))}
    rows = []
    for lr in plan.expressiveness_lrs:
        task = dataclasses.replace(base, lr=lr)
        for seed in plan.expressiveness_seeds:
            for method in EXPRESSIVENESS_METHODS:
                if method == "lorasc-warmup":
                    row = expressiveness.train("lorasc", task, seed, device, **warmup)
                else:
                    row = expressiveness.train(method, task, seed, device)
                rows.append(
                    {"method": method, "lr": lr, "seed": seed, "rel_loss": _r4(row["rel_loss"])}
                )
    return rows


def expressiveness_table(rows: list[dict]) -> str:
    """Markdown: mean held-out loss / untouched per method and lr (the lowest in bold)."""
    lrs = sorted({row["lr"] for row in rows})
    mean = {
        (m, lr): np.mean([r["rel_loss"] for r in rows if r["method"] == m and r["lr"] == lr])
        for m in EXPRESSIVENESS_METHODS
        for lr in lrs
    }
    lines = [
        "| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
        "|---" * (len(lrs) + 1) + "|",
    ]
    for m in EXPRESSIVENESS_METHODS:
        best = min(lrs, key=lambda lr, m=m: np.nan_to_num(mean[m, lr], nan=np.inf))
        cells = [f"**{mean[m, lr]:.4f}**" if lr == best else f"{mean[m, lr]:.4f}" for lr in lrs]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- plot --------------------------------------------------------------------------------

COLORS = {"full": "C2", "lora": "C0", "lorasc": "C1", "lorasc-paper": "C4"}  # plotted kinds


def plot(runs: list[Run], chosen: dict, targets: dict, path: Path, title: str) -> Path | None:
    """Per setting and rank: task-B test accuracy against task-A accuracy along training,
    mean over seeds at each method's chosen lr (o: the end, ×: the matched point; dashed:
    the fewer cascades; the warm-up variants are left to the tables); None without
    matplotlib."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        print("skip the forgetting plot: matplotlib is not installed")
        return None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    settings = list(targets)
    ranks = sorted({run.method.rank for run in runs} - {0})
    most = max(run.method.cascades for run in runs)
    figure, axes = plt.subplots(
        len(settings), len(ranks), figsize=(5.5 * len(ranks), 4.8 * len(settings)), squeeze=False
    )
    for row, setting in zip(axes, settings, strict=True):
        for axis, rank in zip(row, ranks, strict=True):
            for method in methods_of(runs, setting):
                if method.rank not in (0, rank) or method.kind not in COLORS:
                    continue
                lr = chosen[setting, method]
                mine = [r for r in runs if (r.setting, r.method, r.lr) == (setting, method, lr)]
                curves = np.array([r.curve for r in mine]).mean(0)  # points × (step, vB, tB, tA)
                color = COLORS[method.kind]
                axis.plot(
                    curves[:, 2],
                    curves[:, 3],
                    "--" if 0 < method.cascades < most else "-",
                    color=color,
                    label=f"{method.name} (lr {lr:g})",
                    linewidth=1.2,
                )
                axis.plot(curves[-1, 2], curves[-1, 3], "o", color=color)
                matched = np.array([matched_point(r, targets[setting]) for r in mine])
                axis.plot(*matched[:, 2:].mean(0), "x", color=color, markersize=9)
            axis.set(
                xlabel="task B test accuracy",
                ylabel="task A test accuracy",
                title=f"{setting}, r={rank} (×: val B first ≥ {targets[setting]:.2f}; o: end)",
            )
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# -- the family --------------------------------------------------------------------------


def summary_rows(runs: list[Run], chosen: dict, targets: dict) -> list[dict]:
    """One printed row per (setting, method) at its chosen lr: means over seeds."""
    index = by_key(runs)
    seeds = sorted({run.seed for run in runs})
    rows = []
    for (setting, method), lr in chosen.items():
        mine = [index[setting, method, lr, seed] for seed in seeds]
        matched = [matched_point(run, targets[setting]) for run in mine]
        rows.append(
            {
                "setting": setting,
                "method": method.name,
                "lr": lr,
                "val_b": _r4(np.mean([r.final[1] for r in mine])),
                "test_b": _r4(np.mean([r.final[2] for r in mine])),
                "test_a": _r4(np.mean([r.final[3] for r in mine])),
                "target": round(targets[setting], 2),
                "test_a_matched": _r4(np.mean([p[3] for p in matched])),
            }
        )
    return rows


def report(runs: list[Run], chosen: dict, targets: dict, sweep: list[dict], header: str) -> str:
    """The Markdown report: per setting the results, paired and lr tables; then the
    expressiveness task over learning rates."""
    parts = [header]
    for setting, target in targets.items():
        parts += [
            f"## {setting}",
            f"At each method's chosen lr, mean ± std over seeds; matched: at the first point "
            f"where task-B validation accuracy reaches {target:.2f}.\n\n"
            f"{results_table(runs, chosen, target, setting)}",
            "Paired by seed, a − b: mean ± std (seeds with a − b > 0); lr of a: its own "
            "chosen lr, or b's:\n\n"
            f"{paired_table(runs, chosen, target, setting)}",
            "Task-B validation accuracy at the end, mean over seeds, per lr (chosen in bold):"
            f"\n\n{sweep_table(runs, chosen, setting)}",
        ]
    parts += [
        "## expressiveness task over learning rates",
        "Held-out loss / untouched, mean over seeds (best in bold):\n\n"
        + expressiveness_table(sweep),
    ]
    return "\n\n".join(parts) + "\n"


def write_text(text: str, path: Path) -> None:
    atomic_write(path, lambda temporary: temporary.write_text(text))


def run(quick: bool, device: str, out_dir: Path) -> list[dict]:
    """Both settings, every method, lr and seed (``quick``: r=1, T=2, 2 lrs, 2 seeds, 24
    steps of a 32-wide MLP), and the expressiveness task over lrs; writes the files."""
    plan = QUICK if quick else Plan()
    started = time.perf_counter()
    runs = [r for s in SETTINGS for r in run_setting(s, plan, torch.device(device))]
    chosen = chosen_lrs(runs)
    targets = matched_targets(runs, chosen)
    sweep = expressiveness_sweep(plan, quick, device)
    name = device_name(device)
    out_dir = Path(out_dir)
    write_csv(csv_rows(runs, chosen, targets), out_dir / f"forgetting_{name}.csv")
    write_csv(sweep, out_dir / f"lr_sweep_expressiveness_{name}.csv")
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    header = (
        f"# Forgetting: {name}, torch {torch.__version__}, {stamp} UTC, "
        f"{time.perf_counter() - started:.0f} s\n\n"
        f"{len(plan.seeds)} seeds, {plan.steps} steps of batch {plan.batch}, lr grid "
        f"{', '.join(f'{lr:g}' for lr in plan.lrs)}, MLP width {plan.hidden}; "
        "`python -m benchmarks --only forgetting --threads 1`" + (" --quick" if quick else "")
    )
    write_text(report(runs, chosen, targets, sweep, header), out_dir / f"forgetting_{name}.md")
    png = plot(runs, chosen, targets, out_dir / f"forgetting_{name}.png", f"{name}, {stamp} UTC")
    if png:
        print(f"forgetting plot: {png}")
    return summary_rows(runs, chosen, targets)


if __name__ == "__main__":
    family_main(run, __doc__.split("\n")[0], "r=1, T=2, 2 lrs, 2 seeds, 24 steps")
