"""Helpers shared by the benchmark scripts: timing, device naming, CSV output."""

from __future__ import annotations

import csv
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: str) -> str:
    """A file-name-safe name of the machine: the GPU's name, or the CPU's model and cores."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = f"{platform.processor() or platform.machine()}-{torch.get_num_threads()}threads"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def time_ms(fn, device: str, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on GPU, wall clock on CPU."""
    if device.startswith("cuda"):
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def append_csv(rows: list[dict], path: Path) -> None:
    """Append ``rows`` to the CSV at ``path``, writing the header if the file is new."""
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
