"""Precision of many small merges into a bf16 or fp8 weight: round-to-nearest vs stochastic.

A bf16 ``W0`` (4096×4096 on a GPU, 1024×1024 on the CPU; entries ``0.02·N(0, 1)``) receives
``merges`` successive rank-16 merges ``W ← round(W + c·B A)``, fresh ``A``, ``B`` each time
from a fixed seed. Their entries are drawn from ``N(0.5, 1)``: the updates share a positive
drift, as when successive cascades keep pushing a weight one way, so that a rounding bias
shows in the mean. ``c`` makes the mean ``|c·B A|`` equal ``update_size · mean|W0|``
(1e-3, a typical LoRA step; about a tenth of a bf16 ulp). The same updates are accumulated
in float64 (``W64``). The fp8 rows run the same on an fp8 e4m3 ``W0`` with per-row scales
(the same entries quantized, ``docs/fp8.md``) and ``update_size`` 1e-2, about a tenth of an
e4m3 step (a step is an eighth of the value's power of two, ~0.09·|w| on average).

Columns: ``rel_error = ‖W − W64‖ / ‖W64 − W0‖`` (error relative to the accumulated update),
``mean_bias = mean(W − W64) / mean|W64 − W0|`` (−1: the whole update lost, 0: unbiased)
and ``max_abs_error = max|W − W64|`` (TRL issue #6688 reports 1.49e-2 max-abs drift after
1000 bf16 merge/unmerge cycles of a real adapter, another protocol on larger updates);
``rescales``: how many times a row's scale grew to keep its values in e4m3's range (the
rescale rule, fp8 only), summed over the merges.

Usage: ``python -m benchmarks.merge_precision [--quick] [--device cuda]``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks.common import append_csv, device_name, family_main, significant
from lorasc_kernels import ScaledWeight, merge_lowrank_
from lorasc_kernels.formats.quantize import format_dtype, quantize

RANK = 16
# Mean |c·B A| relative to mean |W0|: about a tenth of the format's step.
UPDATE_SIZE = {"bfloat16": 1e-3, "fp8_e4m3": 1e-2}
ROUNDINGS = ("nearest", "stochastic")


class _Weight:
    """A bf16 weight, or an fp8 e4m3 one with its per-row scales, merged in place."""

    def __init__(self, start: torch.Tensor, weight_format: str):
        if weight_format == "bfloat16":
            self.weight = start.to(torch.bfloat16)
        else:
            self.weight = quantize(start, format_dtype(weight_format))
        self.rescales = 0

    def clone(self) -> _Weight:
        copy = _Weight.__new__(_Weight)
        weight = self.weight
        copy.weight = (
            ScaledWeight(weight.codes.clone(), weight.scale.clone())
            if isinstance(weight, ScaledWeight)
            else weight.clone()
        )
        copy.rescales = 0
        return copy

    def float64(self) -> torch.Tensor:
        if isinstance(self.weight, ScaledWeight):
            return self.weight.dequantize(torch.float64)
        return self.weight.double()

    def merge(self, lora_B, lora_A, coeff: float, rounding: str, seed: int) -> None:
        scaled = isinstance(self.weight, ScaledWeight)
        before = self.weight.scale.clone() if scaled else None
        merge_lowrank_(self.weight, lora_B, lora_A, coeff, rounding=rounding, seed=seed)
        if scaled:
            self.rescales += int((self.weight.scale != before).sum())


def _lowrank(generator: torch.Generator, rows: int, cols: int, device: str):
    """Fresh ``B`` (rows, RANK) and ``A`` (RANK, cols), float32 entries from N(0.5, 1)."""
    lora_B = torch.randn(rows, RANK, generator=generator, device=device) + 0.5
    lora_A = torch.randn(RANK, cols, generator=generator, device=device) + 0.5
    return lora_B, lora_A


def measure(
    size: int, merges: int, device: str, seed: int = 0, weight_format: str = "bfloat16"
) -> list[dict]:
    """Run ``merges`` merges on one weight (``"bfloat16"`` or ``"fp8_e4m3"``) per rounding
    mode; one result row each."""
    generator = torch.Generator(device).manual_seed(seed)
    initial = _Weight(
        0.02 * torch.randn(size, size, generator=generator, device=device), weight_format
    )
    weights = [initial.clone() for _ in ROUNDINGS]
    start = initial.float64()
    accumulated = start.clone()
    coeff = None
    began = time.perf_counter()
    for step in range(merges):
        lora_B, lora_A = _lowrank(generator, size, size, device)
        update = lora_B.double() @ lora_A.double()
        if coeff is None:  # fixed from the first update, as a cascade's slow_rate · scale
            coeff = (
                UPDATE_SIZE[weight_format] * float(start.abs().mean()) / float(update.abs().mean())
            )
        accumulated += coeff * update
        for weight, rounding in zip(weights, ROUNDINGS, strict=True):
            weight.merge(lora_B, lora_A, coeff, rounding, seed=step)
    seconds = time.perf_counter() - began
    total = accumulated - start
    rows = []
    for weight, rounding in zip(weights, ROUNDINGS, strict=True):
        error = weight.float64() - accumulated
        rows.append(
            {
                "device": device_name(device),
                "weight_dtype": weight_format,
                "rounding": rounding,
                "size": size,
                "rank": RANK,
                "merges": merges,
                "update_size_rel": UPDATE_SIZE[weight_format],
                "rel_error": significant(float(error.norm() / total.norm())),
                "mean_bias": significant(float(error.mean() / total.abs().mean())),
                "max_abs_error": significant(float(error.abs().max())),
                "update_max_abs": significant(float(total.abs().max())),
                "rescales": weight.rescales,
                "run_time_s": round(seconds, 1),
            }
        )
    return rows


def run(quick: bool, device: str, out_dir: Path) -> list[dict]:
    """1000 merges at 4096² on a GPU, 1024² on the CPU, into bf16 then fp8; ``quick``: 100
    merges, a quarter side."""
    size = 4096 if device.startswith("cuda") else 1024
    rows = [
        row
        for weight_format in UPDATE_SIZE
        for row in measure(
            size // 4 if quick else size,
            100 if quick else 1000,
            device,
            weight_format=weight_format,
        )
    ]
    append_csv(rows, Path(out_dir) / f"merge_precision_{device_name(device)}.csv")
    return rows


if __name__ == "__main__":
    family_main(run, __doc__.split("\n")[0], "100 merges on a 4x smaller side")
