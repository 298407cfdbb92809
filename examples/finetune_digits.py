"""LoRA vs LoRASC vs full fine-tuning on handwritten digits, clean and corrupted.

A small vision transformer (16 tokens of 2×2 pixels) is pretrained on digits 0–4 of
scikit-learn's bundled 8×8 digits (cached under ``--cache``), then adapted to digits 5–9
three ways:

* ``lora``:   ``inject_lorasc`` into every block's linear layers, no cascade (plain LoRA);
* ``lorasc``: the same plus a ``Cascade`` with the library's defaults (cascades of fresh
  fast LoRAs, each merged into the weights at its end);
* ``full``:   every weight trained, as a reference.

Two comparisons, on the same seeds:

* ``fewshot`` (LoRA not rank-limited): a few labelled examples per class, rank 4. LoRA
  fits them and does not overfit here, so a tie is what to expect;
* ``distill`` (rank-limited): a fully fine-tuned teacher (every weight trained on the
  whole training half of 5–9) is distilled into rank-1 adapters on the same images (cross
  entropy against the teacher's probabilities). The students start from the pretrained
  linear weights and the teacher's other parameters (embedding, norms, head; frozen), so
  what they must learn is the teacher's change of the 12 linear weights: full rank, which
  a rank-1 LoRA cannot reach and LoRASC's cascades add up to one rank per cascade.

In the few-shot comparison the classification head is new (5 classes) and trained. Each
run is evaluated on the clean test split of 5–9 and on corrupted copies of it (Gaussian
noise, rotations, shifts, blur), the out-of-distribution (OOD) set. Prints a table per
comparison (mean ± std over seeds) and writes ``results.md``, ``results.json``,
``fewshot.png`` and ``distill.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import textwrap
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from common import MemoryMeter, StepTimer, pick_device, trainable_parameters
from scipy import ndimage
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from lorasc_kernels import Cascade, CascadeSettings, LoRASCConfig, inject_lorasc
from lorasc_kernels.formats.registry import WEIGHT_FORMATS

HERE = Path(__file__).resolve().parent
PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
FINETUNE_CLASSES = (5, 6, 7, 8, 9)
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
METHODS = ("lora", "lorasc", "full")
COMPARISONS = ("fewshot", "distill")
CORRUPTIONS = ("noise", "rotate", "shift", "blur")


# -- data --------------------------------------------------------------------------------


@dataclass
class Split:
    """Images (n, 8, 8) in [0, 1] as float32 and labels: classes (n,) counted from 0, or a
    teacher's probabilities (n, classes) as float32."""

    images: np.ndarray
    labels: np.ndarray


def load_split(classes: tuple[int, ...]) -> tuple[Split, Split]:
    """Half of each class of ``classes`` to train from, half to test on (fixed split)."""
    digits = load_digits()
    keep = np.isin(digits.target, classes)
    images = (digits.images[keep] / 16.0).astype(np.float32)
    labels = np.searchsorted(classes, digits.target[keep])
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=0.5, stratify=labels, random_state=0
    )
    return Split(train_x, train_y), Split(test_x, test_y)


def as_tensors(split: Split, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of ``split`` on ``device``."""
    return torch.from_numpy(split.images).to(device), torch.from_numpy(split.labels).to(device)


def few_shots(split: Split, shots: int, seed: int) -> Split:
    """``shots`` examples of each class drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    chosen = np.concatenate(
        [
            rng.choice(np.flatnonzero(split.labels == label), shots, replace=False)
            for label in np.unique(split.labels)
        ]
    )
    return Split(split.images[chosen], split.labels[chosen])


def corrupt(images: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """A corrupted copy of ``images``: noise σ=0.25, rotation ±20°, shift ±1 px, blur σ=0.7."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        out = images + rng.normal(0.0, 0.25, images.shape)
    elif kind == "rotate":
        out = np.stack(
            [
                ndimage.rotate(image, rng.uniform(-20, 20), reshape=False, order=1)
                for image in images
            ]
        )
    elif kind == "shift":
        out = np.stack([ndimage.shift(image, rng.choice([-1, 1], 2), order=0) for image in images])
    elif kind == "blur":
        out = np.stack([ndimage.gaussian_filter(image, 0.7) for image in images])
    else:
        raise ValueError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS}")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


# -- model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """Width, depth, heads, MLP width ratio and patch side of :class:`DigitsTransformer`."""

    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: int = 2
    patch: int = 2


class Block(nn.Module):
    """Pre-norm transformer block with separate q/k/v projections (LoRA targets)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.out_proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        return x.view(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        q, k, v = (self._split_heads(proj(h)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
        x = x + self.out_proj(attended)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DigitsTransformer(nn.Module):
    """8×8 image → (8/patch)² patch tokens → transformer blocks → mean pool → classes."""

    def __init__(self, shape: ModelShape, classes: int):
        super().__init__()
        self.patch = shape.patch
        tokens = (8 // shape.patch) ** 2
        self.embed = nn.Linear(shape.patch**2, shape.dim)
        self.position = nn.Parameter(0.02 * torch.randn(tokens, shape.dim))
        self.blocks = nn.ModuleList(
            Block(shape.dim, shape.heads, shape.mlp_ratio) for _ in range(shape.depth)
        )
        self.norm = nn.LayerNorm(shape.dim)
        self.head = nn.Linear(shape.dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p = self.patch
        batch = images.shape[0]
        patches = images.view(batch, 8 // p, p, 8 // p, p).transpose(2, 3).reshape(batch, -1, p * p)
        x = self.embed(patches) + self.position
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


# -- training ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainSettings:
    """Pretraining on digits 0–4; its hash names the cached backbone."""

    shape: ModelShape = ModelShape()
    epochs: int = 60
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0

    def cache_key(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def batches(count: int, batch_size: int, generator: torch.Generator):
    """Shuffled index batches covering ``count`` items once."""
    order = torch.randperm(count, generator=generator)
    return order.split(batch_size)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` classified as ``labels``, in eval mode (mode restored after)."""
    was_training = model.training
    model.eval()
    correct = sum(
        int((model(x).argmax(-1) == y).sum())
        for x, y in zip(images.split(512), labels.split(512), strict=True)
    )
    model.train(was_training)
    return correct / len(labels)


def pretrain(settings: PretrainSettings, cache: Path, device: torch.device) -> dict:
    """The pretrained state dict for ``settings``, loaded from ``cache`` or trained and saved."""
    path = cache / f"pretrain-{settings.cache_key()}.pt"
    if path.exists():
        print(f"pretrained model: {path} (cached)")
        return torch.load(path, map_location="cpu", weights_only=True)
    torch.manual_seed(settings.seed)
    train, test = load_split(PRETRAIN_CLASSES)
    images, labels = as_tensors(train, device)
    model = DigitsTransformer(settings.shape, len(PRETRAIN_CLASSES)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(settings.seed)
    steps = settings.epochs * math.ceil(len(labels) / settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=steps)
    for _ in tqdm(range(settings.epochs), desc="pretrain on 0-4", unit="epoch"):
        for index in batches(len(labels), settings.batch_size, generator):
            loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    test_accuracy = accuracy(model, *as_tensors(test, device))
    print(f"pretrained on 0-4: held-out accuracy {test_accuracy:.3f}; saved to {path}")
    state = {name: tensor.cpu() for name, tensor in model.state_dict().items()}
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


@dataclass(frozen=True)
class FinetuneSettings:
    """Fine-tuning on digits 5–9, shared by the three methods (``shots``: examples per class
    of the few-shot comparison; the distillation uses the whole training half)."""

    epochs: int = 40
    shots: int = 16
    batch_size: int = 16
    rank: int = 4
    lora_alpha: float = 8
    lora_lr: float = 5e-3
    full_lr: float = 1e-3
    slow_rate: float = CascadeSettings.slow_rate
    noise_lambda: float = CascadeSettings.noise_lambda
    slow_other_params: bool = CascadeSettings.slow_other_params
    warmup_steps: int = CascadeSettings.warmup_steps
    epochs_per_cascade: int = 10
    train_head: bool = True
    backend: str = "auto"
    weight_format: str | None = None  # "fp8_e4m3", "fp8_e5m2": LoRA on an fp8 base weight
    compute: str | None = None  # "fp8" (with a weight_format): GEMMs on fp8 operands


FEWSHOT = FinetuneSettings()
# Rank-1 students of a full-rank teacher; 12 cascades of 5 epochs over the 448 images.
DISTILL = FinetuneSettings(
    epochs=60, batch_size=64, rank=1, lora_alpha=2, epochs_per_cascade=5, train_head=False
)
# The teacher: every weight trained on the labels of the whole training half.
TEACHER = FinetuneSettings(epochs=30, batch_size=64)


@dataclass
class RunResult:
    """One method on one seed: final accuracies, costs, and per-epoch loss and accuracy."""

    method: str
    seed: int
    clean: float
    ood: float
    ood_by_kind: dict[str, float]
    ms_per_step: float
    memory_mib: float
    trainable: int
    losses: list[float]
    curve: list[float]


def without_head(state: dict) -> dict:
    """``state`` without the classification head: a backbone to give a new head."""
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def build_model(
    method: str, start: dict, settings: FinetuneSettings, shape: ModelShape, device: torch.device
) -> nn.Module:
    """A 5-class model holding ``start`` (without head entries: a new head), prepared for
    ``method``; LoRA methods also train the head when ``settings.train_head``."""
    model = DigitsTransformer(shape, len(FINETUNE_CLASSES))
    model.load_state_dict(start, strict=False)
    model.to(device)
    if method != "full":
        inject_lorasc(
            model,
            LoRASCConfig(
                r=settings.rank,
                lora_alpha=settings.lora_alpha,
                target_modules=TARGET_MODULES,
                backend=settings.backend,
                weight_format=settings.weight_format,
                compute=settings.compute,
            ),
        )
        model.head.requires_grad_(settings.train_head)
    return model


def finetune(
    method: str,
    seed: int,
    start: dict,
    train: Split,
    sets: dict,
    settings: FinetuneSettings,
    shape: ModelShape,
    device: torch.device,
) -> tuple[RunResult, nn.Module]:
    """Fine-tune one way from ``start`` (see :func:`build_model`) on ``train`` (cross
    entropy against its labels or probabilities); evaluate on ``sets`` (see
    :func:`evaluation_sets`). Returns the result and the model."""
    torch.manual_seed(seed)
    model = build_model(method, start, settings, shape, device)
    lr = settings.full_lr if method == "full" else settings.lora_lr
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
    )
    images, labels = as_tensors(train, device)
    steps_per_epoch = math.ceil(len(labels) / settings.batch_size)
    cascade = scheduler = None
    if method == "lorasc":
        cascade = Cascade(
            model,
            optimizer,
            steps_per_cascade=settings.epochs_per_cascade * steps_per_epoch,
            slow_rate=settings.slow_rate,
            noise_lambda=settings.noise_lambda,
            slow_other_params=settings.slow_other_params,
            warmup_steps=settings.warmup_steps,
            seed=seed,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cascade.lr_lambda())
    timer, meter = StepTimer(device), MemoryMeter(device)
    generator = torch.Generator().manual_seed(seed)
    losses, curve = [], []
    progress = tqdm(
        total=settings.epochs * steps_per_epoch,
        desc=f"{method:6s} seed {seed}",
        unit="step",
        leave=False,
    )
    step = 0
    for _ in range(settings.epochs):
        epoch_loss = 0.0
        for index in batches(len(labels), settings.batch_size, generator):
            first = step == 0
            with timer.step():
                with meter.saved_activations(model) if first else nullcontext():
                    loss = F.cross_entropy(model(images[index]), labels[index])
                    optimizer.zero_grad()
                    loss.backward()
                optimizer.step()
                if cascade is not None:
                    cascade.step()
                    scheduler.step()
            if first:
                meter.count_state(model, optimizer)
            epoch_loss += loss.item() * len(index) / len(labels)
            step += 1
            progress.update()
        losses.append(epoch_loss)
        curve.append(accuracy(model, *sets["test"]))
        progress.set_postfix(loss=f"{epoch_loss:.3f}", acc=f"{curve[-1]:.3f}")
    progress.close()
    trainable = trainable_parameters(model)
    if cascade is not None:
        model = cascade.finalize()
    clean = accuracy(model, *sets["test"])
    ood_by_kind = {kind: accuracy(model, *sets[kind]) for kind in CORRUPTIONS}
    result = RunResult(
        method,
        seed,
        clean,
        float(np.mean(list(ood_by_kind.values()))),
        ood_by_kind,
        timer.ms_per_step(),
        meter.peak_bytes() / 2**20,
        trainable,
        losses,
        curve,
    )
    return result, model


def distillation(
    pretrained: dict,
    train: Split,
    sets: dict,
    settings: FinetuneSettings,
    shape: ModelShape,
    device: torch.device,
) -> tuple[Split, dict]:
    """Train a teacher fully on ``train`` from the pretrained backbone (seed 0). Returns
    ``train``'s images labelled with its probabilities, and the students' start: the
    pretrained weights of the LoRA targets, the teacher's values of everything else."""
    result, teacher = finetune(
        "full", 0, without_head(pretrained), train, sets, settings, shape, device
    )
    print(
        f"teacher (full fine-tuning on {len(train.labels)} images): clean {result.clean:.3f}"
        f"  OOD {result.ood:.3f}"
    )
    images = torch.from_numpy(train.images).to(device)
    teacher.eval()
    with torch.no_grad():
        probabilities = F.softmax(teacher(images), dim=-1).cpu().numpy()
    targets = tuple(f".{name}." for name in TARGET_MODULES)
    start = {
        name: (pretrained[name] if any(t in name for t in targets) else value.cpu())
        for name, value in teacher.state_dict().items()
    }
    return Split(train.images, probabilities.astype(np.float32)), start


# -- report ------------------------------------------------------------------------------


def evaluation_sets(test: Split, device: torch.device) -> dict:
    """The clean test split and one corrupted copy per kind, as device tensors."""
    sets = {"test": as_tensors(test, device)}
    for index, kind in enumerate(CORRUPTIONS):
        sets[kind] = as_tensors(Split(corrupt(test.images, kind, seed=index), test.labels), device)
    return sets


def mean_std(values, decimals: int = 3) -> str:
    """``"mean ± std"`` with ``decimals`` decimals."""
    return f"{np.mean(values):.{decimals}f} ± {np.std(values):.{decimals}f}"


def results_table(results: list[RunResult], memory_what: str) -> str:
    """Markdown table, one row per method, mean ± std over seeds (train loss: the last
    epoch's mean training loss, which shows how closely each method can fit its targets)."""
    lines = [
        "| method | clean acc | OOD acc | "
        + " | ".join(CORRUPTIONS)
        + f" | train loss | ms/step | memory MiB ({memory_what}) | trainable params |",
        "|---" * (7 + len(CORRUPTIONS)) + "|",
    ]
    for method in METHODS:
        runs = [r for r in results if r.method == method]
        if not runs:
            continue
        by_kind = " | ".join(
            f"{np.mean([r.ood_by_kind[k] for r in runs]):.3f}" for k in CORRUPTIONS
        )
        lines.append(
            f"| {method} | {mean_std([r.clean for r in runs])} "
            f"| {mean_std([r.ood for r in runs])} | {by_kind} "
            f"| {mean_std([r.losses[-1] for r in runs], 4)} "
            f"| {np.mean([r.ms_per_step for r in runs]):.2f} "
            f"| {np.mean([r.memory_mib for r in runs]):.2f} | {runs[0].trainable:,} |"
        )
    return "\n".join(lines)


def plot(results: list[RunResult], path: Path, title: str, epochs_per_cascade: int) -> None:
    """Training loss and clean test accuracy per epoch (LoRASC's cascade boundaries dotted),
    and final accuracies per method."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (loss_axis, curve_axis, bar_axis) = plt.subplots(1, 3, figsize=(15, 4.2))
    methods = [m for m in METHODS if any(r.method == m for r in results)]
    for color, method in zip(("C0", "C1", "C2"), methods, strict=False):
        runs = [r for r in results if r.method == method]
        epochs = np.arange(1, len(runs[0].losses) + 1)
        for axis, field in ((loss_axis, "losses"), (curve_axis, "curve")):
            values = np.array([getattr(r, field) for r in runs])
            axis.plot(epochs, values.mean(0), color=color, label=method)
            axis.fill_between(epochs, values.min(0), values.max(0), color=color, alpha=0.15)
    for axis in (loss_axis, curve_axis):
        for boundary in range(epochs_per_cascade, len(results[0].losses), epochs_per_cascade):
            axis.axvline(boundary, color="C1", linestyle=":", linewidth=1)
    loss_axis.set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss")
    curve_axis.set(
        xlabel="epoch",
        ylabel="accuracy",
        title="clean test accuracy during training\n(dotted: LoRASC's cascade boundaries)",
    )
    width = 0.38
    positions = np.arange(len(methods))
    for offset, field, label in ((-width / 2, "clean", "clean"), (width / 2, "ood", "OOD")):
        values = [[getattr(r, field) for r in results if r.method == m] for m in methods]
        bar_axis.bar(
            positions + offset,
            [np.mean(v) for v in values],
            width,
            yerr=[np.std(v) for v in values],
            capsize=4,
            label=label,
        )
    bar_axis.set(
        xticks=positions,
        xticklabels=methods,
        ylabel="accuracy",
        ylim=(0, 1),
        title="final accuracy (mean ± std over seeds)",
    )
    for axis in (loss_axis, curve_axis, bar_axis):
        axis.legend()
        axis.grid(alpha=0.3)
    figure.suptitle("\n".join(textwrap.wrap(title, 150)))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# -- command line ------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=5,
        help="number of seeds (0..N-1): shots, head, LoRA and noise (default 5)",
    )
    parser.add_argument("--only", choices=COMPARISONS, help="run one comparison (default: both)")
    parser.add_argument(
        "--epochs",
        type=int,
        default=FEWSHOT.epochs,
        help=f"few-shot: fine-tuning epochs over the shots (default {FEWSHOT.epochs})",
    )
    parser.add_argument(
        "--shots",
        type=int,
        default=FEWSHOT.shots,
        help=f"few-shot: labelled examples per class of 5-9 (default {FEWSHOT.shots})",
    )
    parser.add_argument(
        "--rank",
        type=int,
        default=FEWSHOT.rank,
        help=f"few-shot: LoRA rank r (default {FEWSHOT.rank}; lora_alpha = 2r)",
    )
    parser.add_argument(
        "--epochs-per-cascade",
        type=int,
        default=FEWSHOT.epochs_per_cascade,
        help=f"few-shot: LoRASC cascade length in epochs (default {FEWSHOT.epochs_per_cascade})",
    )
    parser.add_argument(
        "--distill-rank",
        type=int,
        default=DISTILL.rank,
        help=f"distillation: rank of the students' adapters (default {DISTILL.rank})",
    )
    parser.add_argument(
        "--slow-rate",
        type=float,
        default=FEWSHOT.slow_rate,
        help="LoRASC: portion of each fast LoRA merged into the weights "
        f"(default {FEWSHOT.slow_rate}, the library's)",
    )
    parser.add_argument(
        "--noise-lambda",
        type=float,
        default=FEWSHOT.noise_lambda,
        help="LoRASC: noise scale relative to each weight's std "
        f"(default {FEWSHOT.noise_lambda}, the library's)",
    )
    parser.add_argument(
        "--slow-other-params",
        action=argparse.BooleanOptionalAction,
        default=FEWSHOT.slow_other_params,
        help="LoRASC: slow update of the head too (default: the library's, "
        f"{FEWSHOT.slow_other_params})",
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=FEWSHOT.warmup_steps,
        help="LoRASC: learning-rate warm-up steps at the start of each cascade "
        f"(default {FEWSHOT.warmup_steps})",
    )
    parser.add_argument(
        "--backend",
        default=FEWSHOT.backend,
        choices=("auto", "torch", "triton", "cuda"),
        help="kernel backend of the LoRASC layers (default auto: Triton or "
        "CUDA on a GPU, the torch reference on the CPU)",
    )
    parser.add_argument(
        "--weight-format",
        default=None,
        choices=tuple(WEIGHT_FORMATS),
        help="store the adapted linear weights of lora and lorasc in this "
        "format (fp8 with per-row scales, docs/fp8.md); full "
        "fine-tuning keeps float32 weights",
    )
    parser.add_argument(
        "--compute",
        default=None,
        choices=("fp8",),
        help="with --weight-format: run the GEMMs of lora and lorasc on fp8 inputs and "
        "gradients (docs/fp8.md's compute mode)",
    )
    parser.add_argument(
        "--device", default="auto", help="torch device (default auto: cuda when available)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default 1: this model's ops are too "
        "small to gain from more, and busy cores make threads spin)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=HERE / "out",
        help="folder for results.md, results.json, fewshot.png, distill.png (default examples/out)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=HERE / ".cache",
        help="folder of the pretrained backbone, keyed by its settings (default examples/.cache)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny settings for a smoke test: 1 seed, few epochs, short "
        "pretraining (numbers mean nothing)",
    )
    return parser.parse_args(argv)


@dataclass
class Comparison:
    """One comparison's settings, the training split it builds from, and its runs."""

    name: str
    title: str
    settings: FinetuneSettings
    runs: list[RunResult] = dataclasses.field(default_factory=list)

    def header(self, seeds: int, device_name: str) -> str:
        s = self.settings
        return (
            f"{self.title}: {s.epochs} epochs, {seeds} seed(s), rank {s.rank}, "
            f"slow_rate {s.slow_rate}, noise_lambda {s.noise_lambda}, slow_other_params "
            f"{s.slow_other_params}, warmup_steps {s.warmup_steps}, "
            f"{s.epochs_per_cascade} epoch(s)/cascade, device {device_name}"
            + (f", lora/lorasc base weights {s.weight_format}" if s.weight_format else "")
            + (f", compute={s.compute}" if s.compute else "")
        )


def paired_difference(runs: list[RunResult]) -> str:
    """``lorasc − lora`` per seed (same shots): clean and OOD accuracy and the last epoch's
    training loss, as mean ± std."""
    by_seed = {(r.method, r.seed): r for r in runs}
    seeds = sorted(
        {r.seed for r in runs if ("lora", r.seed) in by_seed and ("lorasc", r.seed) in by_seed}
    )
    parts = []
    for field, digits_ in (("clean", 3), ("ood", 3), ("train loss", 4)):

        def value(run, field=field):
            return run.losses[-1] if field == "train loss" else getattr(run, field)

        gaps = [value(by_seed["lorasc", s]) - value(by_seed["lora", s]) for s in seeds]
        parts.append(f"{field} {np.mean(gaps):+.{digits_}f} ± {np.std(gaps):.{digits_}f}")
    return f"lorasc − lora, paired by seed ({len(seeds)} seeds): " + ", ".join(parts)


def comparisons(args: argparse.Namespace) -> list[Comparison]:
    """The comparisons the command line asks for, with its settings."""
    lorasc = {
        "slow_rate": args.slow_rate,
        "noise_lambda": args.noise_lambda,
        "slow_other_params": args.slow_other_params,
        "warmup_steps": args.warmup_steps,
        "backend": args.backend,
        "weight_format": args.weight_format,
        "compute": args.compute,
    }
    fewshot = dataclasses.replace(
        FEWSHOT,
        epochs=args.epochs,
        shots=args.shots,
        rank=args.rank,
        lora_alpha=2 * args.rank,
        epochs_per_cascade=args.epochs_per_cascade,
        **lorasc,
    )
    distill = dataclasses.replace(
        DISTILL, rank=args.distill_rank, lora_alpha=2 * args.distill_rank, **lorasc
    )
    if args.quick:
        fewshot = dataclasses.replace(fewshot, epochs=2, shots=4, epochs_per_cascade=1)
        distill = dataclasses.replace(distill, epochs=2, epochs_per_cascade=1)
    chosen = [
        Comparison(
            "fewshot",
            f"few-shot, not rank-limited ({fewshot.shots} shots/class; a tie is expected)",
            fewshot,
        ),
        Comparison(
            "distill",
            "distillation, rank-limited (a full fine-tuning teacher's "
            f"change of the linear weights into rank-{distill.rank} "
            "adapters, 448 images)",
            distill,
        ),
    ]
    return [c for c in chosen if args.only in (None, c.name)]


def main(argv=None) -> dict[str, list[RunResult]]:
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    pretrain_settings = PretrainSettings()
    seeds = args.seeds
    teacher_settings = TEACHER
    if args.quick:
        pretrain_settings = dataclasses.replace(pretrain_settings, epochs=2)
        teacher_settings = dataclasses.replace(TEACHER, epochs=2)
        seeds = 1
    started = time.perf_counter()
    shape = pretrain_settings.shape
    pretrained = pretrain(pretrain_settings, args.cache, device)
    train_pool, test = load_split(FINETUNE_CLASSES)
    sets = evaluation_sets(test, device)
    chosen = comparisons(args)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    memory_what = MemoryMeter(device).what
    args.out.mkdir(parents=True, exist_ok=True)
    report = []
    for comparison in chosen:
        start = without_head(pretrained)
        if comparison.name == "distill":
            train, start = distillation(
                pretrained, train_pool, sets, teacher_settings, shape, device
            )
        for seed in range(seeds):
            if comparison.name == "fewshot":
                train = few_shots(train_pool, comparison.settings.shots, seed)
            for method in METHODS:
                result, _ = finetune(
                    method, seed, start, train, sets, comparison.settings, shape, device
                )
                print(
                    f"{comparison.name} {method:6s} seed {seed}: clean {result.clean:.3f}  "
                    f"OOD {result.ood:.3f}  {result.ms_per_step:.2f} ms/step"
                )
                comparison.runs.append(result)
        header = comparison.header(seeds, device_name)
        text = (
            f"{header}\n\n{results_table(comparison.runs, memory_what)}\n\n"
            f"{paired_difference(comparison.runs)}\n"
        )
        print(f"\n{text}")
        report.append(text)
        plot(
            comparison.runs,
            args.out / f"{comparison.name}.png",
            header,
            comparison.settings.epochs_per_cascade,
        )

    (args.out / "results.md").write_text("\n".join(report))
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "seeds": seeds,
                "device": device_name,
                "memory_measures": memory_what,
                **{
                    c.name: {
                        "settings": dataclasses.asdict(c.settings),
                        "runs": [dataclasses.asdict(r) for r in c.runs],
                    }
                    for c in chosen
                },
            },
            indent=1,
        )
    )
    names = ", ".join(f"{c.name}.png" for c in chosen)
    print(
        f"wrote {args.out}/results.md, results.json, {names} "
        f"in {time.perf_counter() - started:.0f} s"
    )
    return {c.name: c.runs for c in chosen}


if __name__ == "__main__":
    main()
