"""Expressiveness: the rank of the update LoRA, LoRASC and full fine-tuning can learn.

A frozen linear layer ``W0`` (d×d, d=64, ``nn.Linear``'s init) must learn a target change
``ΔW`` of known rank (32 > r): orthonormal factors, all singular values equal, ``‖ΔW‖ =
0.5‖W0‖``. Inputs ``x ~ N(0, I)``, targets ``(W0 + ΔW) x``, a fresh batch of 128 per step,
squared error, Adam (lr 1e-2, cosine decay to 0 over the run), the same steps for every
method:

* ``lora-r``: LoRA of rank r = 4, no cascade;
* ``lora-rT``: LoRA of rank r·T = 64;
* ``lorasc``: LoRA of rank r over T = 16 cascades (``Cascade`` with its defaults,
  ``steps_per_cascade`` = steps / T; the cosine through ``cascade.lr_lambda``), then
  ``finalize()``;
* ``lorasc-paper``: the same with the paper's settings, ``slow_rate=0.5, noise_lambda=0.15``;
* ``full``: ``W`` itself trained.

Columns: ``rel_loss`` = held-out loss / the untouched model's (4096 held-out inputs;
0 is the target, 1 is ``W0``); ``rank_floor`` = the best any rank-r update reaches,
``1 − r/32``; ``eff_rank`` = entropy effective rank (Roy & Vetterli 2007) of the learned
update ``W − W0`` (the target's is 32); ``steps``; ``trainable`` parameters; ``optim_KiB``,
the optimizer state at the last step. One row per method, mean ± std over 3 seeds; the
per-seed rows go to ``expressiveness_<device>.csv`` and the learning curves and singular
values to ``expressiveness_<device>.png`` (skipped with a message without matplotlib).

Usage: ``python -m benchmarks.bench_expressiveness [--quick] [--device cuda]``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import append_csv, device_name, family_main, significant
from lorasc_kernels import Cascade, LoRASCLinear

METHODS = ("lora-r", "lora-rT", "lorasc", "lorasc-paper", "full")
PAPER_SETTINGS = {"slow_rate": 0.5, "noise_lambda": 0.15}
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Task:
    """The target change (``dim``, ``target_rank``) and the training of every method."""

    dim: int = 64
    target_rank: int = 32
    rank: int = 4
    cascades: int = 16
    steps_per_cascade: int = 150
    batch: int = 128
    lr: float = 1e-2
    held_out: int = 4096

    @property
    def steps(self) -> int:
        return self.cascades * self.steps_per_cascade

    @property
    def rank_floor(self) -> float:
        """Relative loss of the best rank-``rank`` update (flat spectrum: 1 − r/target)."""
        return max(0.0, 1.0 - self.rank / self.target_rank)


QUICK = Task(dim=16, target_rank=8, rank=2, cascades=4, steps_per_cascade=20, held_out=512)


def target_change(weight: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor:
    """``c · U Vᵀ`` (U, V: d×rank orthonormal) with ``‖·‖ = 0.5 ‖weight‖``."""
    dim = weight.shape[0]
    u = torch.linalg.qr(torch.randn(dim, rank, generator=generator))[0]
    v = torch.linalg.qr(torch.randn(dim, rank, generator=generator))[0]
    change = u @ v.T
    return change * (0.5 * weight.norm() / change.norm())


def effective_rank(matrix: torch.Tensor) -> float:
    """``exp`` of the entropy of the normalised singular values (Roy & Vetterli 2007)."""
    singular = torch.linalg.svdvals(matrix.double())
    p = singular / singular.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def build(method: str, weight: torch.Tensor, task: Task) -> nn.Module:
    """A layer holding ``weight`` (frozen, except for ``full``) prepared for ``method``."""
    dim = task.dim
    if method == "full":
        layer = nn.Linear(dim, dim, bias=False)
        layer.weight.data.copy_(weight)
        return layer
    rank = task.rank * task.cascades if method == "lora-rT" else task.rank
    layer = LoRASCLinear(dim, dim, bias=False, r=rank, lora_alpha=2 * rank, backend="torch")
    layer.weight.data.copy_(weight)
    return layer


def effective_weight(model: nn.Module) -> torch.Tensor:
    """The weight ``model`` applies: ``W + s·B A`` for a LoRA layer, ``W`` otherwise."""
    weight = model.weight.detach()
    if isinstance(model, LoRASCLinear):
        return weight + model.scaling * (model.lora_B.detach() @ model.lora_A.detach())
    return weight


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )


def train(method: str, task: Task, seed: int, device: str = "cpu", **cascade_settings) -> dict:
    """Train ``method`` on the task drawn with ``seed``: the result row plus its curve
    (relative held-out loss at each cascade boundary) and the learned update ``delta``.

    ``cascade_settings`` go to ``Cascade`` (``lorasc`` only), e.g. ``slow_rate``.
    """
    generator = torch.Generator().manual_seed(seed)
    weight = nn.Linear(task.dim, task.dim, bias=False).weight.detach()
    nn.init.kaiming_uniform_(weight, a=5**0.5, generator=generator)  # nn.Linear's init
    target = weight + target_change(weight, task.target_rank, generator)
    held_x = torch.randn(task.held_out, task.dim, generator=generator).to(device)
    weight, target = weight.to(device), target.to(device)
    held_y, untouched = held_x @ target.T, float((held_x @ (weight - target).T).pow(2).mean())
    torch.manual_seed(seed)  # the fast LoRA's first A
    model = build(method, weight, task).to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=task.lr)

    def cosine(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * step / task.steps))

    cascade, schedule = None, cosine
    if method.startswith("lorasc"):
        settings = PAPER_SETTINGS if method == "lorasc-paper" else cascade_settings
        cascade = Cascade(
            model, optimizer, steps_per_cascade=task.steps_per_cascade, seed=seed, **settings
        )
        schedule = cascade.lr_lambda(cosine)  # times the per-cascade warm-up, if any
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    def rel_loss() -> float:
        with torch.no_grad():
            return float((model(held_x) - held_y).pow(2).mean()) / untouched

    curve, started = [], time.perf_counter()
    for step in range(task.steps):
        x = torch.randn(task.batch, task.dim, generator=generator).to(device)
        loss = (model(x) - x @ target.T).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == task.steps - 1:
            state_bytes = optimizer_bytes(optimizer)
        if cascade is not None:
            cascade.step()
        scheduler.step()
        if (step + 1) % task.steps_per_cascade == 0:
            curve.append(rel_loss())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if cascade is not None:
        model = cascade.finalize()  # the noise removed; the last merge done at the boundary
    delta = effective_weight(model).cpu() - weight.cpu()
    return {
        "method": method,
        "seed": seed,
        "rel_loss": rel_loss(),
        "rank_floor": task.rank_floor,
        "eff_rank": effective_rank(delta),
        "steps": task.steps,
        "trainable": trainable,
        "optim_KiB": state_bytes / 1024,
        "seconds": time.perf_counter() - started,
        "curve": curve,
        "delta": delta,
        "target_delta": (target - weight).cpu(),
    }


def summarize(rows: list[dict]) -> list[dict]:
    """One row per method: mean ± std over seeds of the loss and the effective rank."""
    summary = []
    for method in dict.fromkeys(row["method"] for row in rows):
        runs = [row for row in rows if row["method"] == method]
        losses = torch.tensor([row["rel_loss"] for row in runs], dtype=torch.float64)
        ranks = torch.tensor([row["eff_rank"] for row in runs], dtype=torch.float64)
        summary.append(
            {
                "method": method,
                "seeds": len(runs),
                "rel_loss": f"{losses.mean():.4f} ± {losses.std(unbiased=False):.4f}",
                "rank_floor": significant(runs[0]["rank_floor"], 3),
                "eff_rank": f"{ranks.mean():.1f} ± {ranks.std(unbiased=False):.1f}",
                "steps": runs[0]["steps"],
                "trainable": runs[0]["trainable"],
                "optim_KiB": significant(runs[0]["optim_KiB"], 3),
            }
        )
    return summary


def plot(rows: list[dict], task: Task, path: Path, title: str) -> Path | None:
    """Held-out loss per cascade length of steps, and the singular values of seed 0's
    learned updates against the target's; None (with a message) without matplotlib."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        print("skip the expressiveness plot: matplotlib is not installed")
        return None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (curves, spectra) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [task.steps_per_cascade * (i + 1) for i in range(task.cascades)]
    for color, method in zip(("C0", "C3", "C1", "C4", "C2"), METHODS, strict=True):
        runs = [row for row in rows if row["method"] == method]
        values = torch.tensor([row["curve"] for row in runs])
        curves.plot(steps, values.mean(0), color=color, label=method)
        curves.fill_between(
            steps, values.min(0).values, values.max(0).values, color=color, alpha=0.15
        )
        spectra.plot(torch.linalg.svdvals(runs[0]["delta"]), color=color, label=method)
    curves.axhline(task.rank_floor, color="C0", linestyle=":", label="rank-r floor")
    spectra.plot(torch.linalg.svdvals(rows[0]["target_delta"]), "k--", label="target")
    curves.set(
        xlabel="step (points: cascade boundaries)",
        ylabel="held-out loss / untouched",
        yscale="log",
        title="held-out loss (mean, min-max over seeds)",
    )
    spectra.set(
        xlabel="index",
        ylabel="singular value",
        yscale="log",
        ylim=(1e-4, None),
        title="singular values of the learned update (seed 0)",
    )
    for axis in (curves, spectra):
        axis.legend()
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def run(quick: bool, device: str, out_dir: Path) -> list[dict]:
    """Every method on 3 seeds (``quick``: a 16-wide layer, 4 cascades of 20 steps)."""
    task = QUICK if quick else Task()
    rows = [train(method, task, seed, device) for seed in SEEDS for method in METHODS]
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    name = device_name(device)
    append_csv(
        [
            {
                "date_utc": stamp,
                "device": name,
                **{
                    k: (significant(v) if isinstance(v, float) else v)
                    for k, v in row.items()
                    if k not in ("curve", "delta", "target_delta")
                },
            }
            for row in rows
        ],
        Path(out_dir) / f"expressiveness_{name}.csv",
    )
    title = (
        f"target rank {task.target_rank}, d={task.dim}, r={task.rank}, "
        f"T={task.cascades} cascades of {task.steps_per_cascade} steps; {name}, {stamp} UTC"
    )
    png = plot(rows, task, Path(out_dir) / f"expressiveness_{name}.png", title)
    if png:
        print(f"expressiveness plot: {png}")
    return summarize(rows)


if __name__ == "__main__":
    family_main(run, __doc__.split("\n")[0], "a 16-wide layer, 4 cascades of 20 steps")
