"""How much a rank-k PEFT export of a long LoRASC run loses: the digits model of
``finetune_digits.py`` adapted to digits 5–9 by LoRASC (r=4, 80 cascades, history kept),
then ``Cascade.export_peft_adapter(path, max_rank=k)`` for several k: the relative Frobenius
error per layer, and the test accuracy of the base model plus the rank-k adapter.

    python examples/peft_rank_study.py [--cascades 80] [--steps-per-cascade 10] [--ranks 4 8]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from finetune_digits import (
    FINETUNE_CLASSES,
    TARGET_MODULES,
    DigitsTransformer,
    PretrainSettings,
    accuracy,
    as_tensors,
    batches,
    load_split,
    pretrain,
    without_head,
)

from lorasc_kernels import Cascade, LoRASCConfig, inject_lorasc

HERE = Path(__file__).resolve().parent


def main(argv=None) -> dict[int, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cascades", type=int, default=80)
    parser.add_argument("--steps-per-cascade", type=int, default=10)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--pretrain-epochs", type=int, default=PretrainSettings.epochs)
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    args = parser.parse_args(argv)
    settings = PretrainSettings(epochs=args.pretrain_epochs)
    start = without_head(pretrain(settings, args.cache, torch.device("cpu")))
    torch.manual_seed(0)  # after pretrain(), which draws only when nothing is cached
    train, test = load_split(FINETUNE_CLASSES)
    images, labels = as_tensors(train, torch.device("cpu"))
    test_sets = as_tensors(test, torch.device("cpu"))

    model = DigitsTransformer(settings.shape, len(FINETUNE_CLASSES))
    model.load_state_dict(start, strict=False)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lorasc(
        model, LoRASCConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGET_MODULES)
    )
    model.head.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    cascade = Cascade(model, optimizer, steps_per_cascade=args.steps_per_cascade, keep_history=True)
    generator = torch.Generator().manual_seed(0)
    steps = args.cascades * args.steps_per_cascade - 1  # finalize() merges the last one
    while steps > 0:
        for index in batches(len(labels), 16, generator):
            F.cross_entropy(model(images[index]), labels[index]).backward()
            optimizer.step()
            optimizer.zero_grad()
            cascade.step()
            steps -= 1
            if steps == 0:
                break
    model = cascade.finalize()
    print(
        f"{cascade.cascade_index} merges of rank {args.rank} into {len(cascade.layers)} "
        f"layers; finalized model: test accuracy {accuracy(model, *test_sets):.3f}"
    )
    head = {k: v for k, v in model.state_dict().items() if k.startswith("head.")}

    logging.getLogger("lorasc_kernels").setLevel(logging.WARNING)  # the table says it all
    results = {}
    print("| max_rank | relative error, mean over layers | max | test accuracy | export s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for k in args.ranks:
            started = time.perf_counter()
            cascade.export_peft_adapter(Path(folder) / f"rank{k}", max_rank=k)
            seconds = time.perf_counter() - started
            errors = list(cascade.export_errors.values())
            served = served_model(settings, base, head, Path(folder) / f"rank{k}")
            results[k] = {
                "mean": sum(errors) / len(errors),
                "max": max(errors),
                "accuracy": accuracy(served, *test_sets),
            }
            print(
                f"| {k} | {results[k]['mean']:.4f} | {results[k]['max']:.4f} | "
                f"{results[k]['accuracy']:.3f} | {seconds:.2f} |"
            )
    return results


def served_model(settings, base: dict, head: dict, folder: Path):
    """The base model (the run's head) with the adapter in ``folder`` merged by PEFT."""
    from peft import PeftModel

    model = DigitsTransformer(settings.shape, len(FINETUNE_CLASSES))
    model.load_state_dict({**base, **head})
    return PeftModel.from_pretrained(model, folder).merge_and_unload().eval()


if __name__ == "__main__":
    main()
