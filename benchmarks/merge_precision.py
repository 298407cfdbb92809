"""Precision of many small merges into a bf16 weight: round-to-nearest vs stochastic.

A bf16 ``W0`` (4096×4096 on a GPU, 1024×1024 on the CPU; entries ``0.02·N(0, 1)``) receives
``merges`` successive rank-16 merges ``W ← round(W + c·B A)``, fresh ``A``, ``B`` each time
from a fixed seed. Their entries are drawn from ``N(0.5, 1)``: the updates share a positive
drift, as when successive cascades keep pushing a weight one way, so that a rounding bias
shows in the mean. ``c`` makes the mean ``|c·B A|`` equal ``update_size · mean|W0|``
(1e-3, a typical LoRA step; about a tenth of a bf16 ulp). The same updates are accumulated
in float64 (``W64``).

Columns: ``rel_error = ‖W − W64‖ / ‖W64 − W0‖`` (error relative to the accumulated update),
``mean_bias = mean(W − W64) / mean|W64 − W0|`` (−1: the whole update lost, 0: unbiased)
and ``max_abs_error = max|W − W64|`` (TRL issue #6688 reports 1.49e-2 max-abs drift after
1000 bf16 merge/unmerge cycles of a real adapter, another protocol on larger updates).

Usage: ``python -m benchmarks.merge_precision [--quick] [--device cuda]``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks.common import append_csv, device_name, family_main, significant
from lorasc_kernels import merge_lowrank_

RANK = 16
UPDATE_SIZE = 1e-3
ROUNDINGS = ("nearest", "stochastic")


def _lowrank(generator: torch.Generator, rows: int, cols: int, device: str):
    """Fresh ``B`` (rows, RANK) and ``A`` (RANK, cols), float32 entries from N(0.5, 1)."""
    lora_B = torch.randn(rows, RANK, generator=generator, device=device) + 0.5
    lora_A = torch.randn(RANK, cols, generator=generator, device=device) + 0.5
    return lora_B, lora_A


def measure(size: int, merges: int, device: str, seed: int = 0) -> list[dict]:
    """Run ``merges`` merges on one bf16 weight per rounding mode; one result row each."""
    generator = torch.Generator(device).manual_seed(seed)
    start = 0.02 * torch.randn(size, size, generator=generator, device=device)
    start = start.to(torch.bfloat16)
    weights = [start.clone() for _ in ROUNDINGS]
    start = start.double()
    accumulated = start.clone()
    coeff = None
    began = time.perf_counter()
    for step in range(merges):
        lora_B, lora_A = _lowrank(generator, size, size, device)
        update = lora_B.double() @ lora_A.double()
        if coeff is None:  # fixed from the first update, as a cascade's slow_rate · scale
            coeff = UPDATE_SIZE * float(start.abs().mean()) / float(update.abs().mean())
        accumulated += coeff * update
        for weight, rounding in zip(weights, ROUNDINGS, strict=True):
            merge_lowrank_(weight, lora_B, lora_A, coeff, rounding, seed=step)
    seconds = time.perf_counter() - began
    total = accumulated - start
    rows = []
    for weight, rounding in zip(weights, ROUNDINGS, strict=True):
        error = weight.double() - accumulated
        rows.append({
            "device": device_name(device),
            "weight_dtype": "bfloat16",
            "rounding": rounding,
            "size": size,
            "rank": RANK,
            "merges": merges,
            "update_size_rel": UPDATE_SIZE,
            "rel_error": significant(float(error.norm() / total.norm())),
            "mean_bias": significant(float(error.mean() / total.abs().mean())),
            "max_abs_error": significant(float(error.abs().max())),
            "update_max_abs": significant(float(total.abs().max())),
            "run_time_s": round(seconds, 1),
        })
    return rows


def run(quick: bool, device: str, out_dir: Path) -> list[dict]:
    """1000 merges at 4096² on a GPU, 1024² on the CPU; ``quick``: 100 merges, a quarter side."""
    size = 4096 if device.startswith("cuda") else 1024
    rows = measure(size // 4 if quick else size, 100 if quick else 1000, device)
    append_csv(rows, Path(out_dir) / f"merge_precision_{device_name(device)}.csv")
    return rows


if __name__ == "__main__":
    family_main(run, __doc__.split("\n")[0], "100 merges on a 4x smaller side")
