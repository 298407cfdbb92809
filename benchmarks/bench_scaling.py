"""How the Cascade's costs grow with the run's length T and the model's size, side by side.

Families (one CSV row per measurement, ``family`` and ``variant`` say which):

* ``boundary_vs_T``: one boundary of a one-layer model (``--width``² weight, rank
  ``--rank``) after ``T − 1`` kept updates, history and metrics on (``track_metrics(every=1)``),
  kept in memory (``memory``) or in ``history_dir`` (``disk``); and beside them
  ``full_svd``, the run-wide effective rank as it was computed before
  :class:`~lorasc_kernels.cascade.lowrank.LowRankSum` (QR of all ``r·T`` stacked factors and the
  SVD of the core, :func:`~lorasc_kernels.cascade.lowrank.lowrank_svd`), timed alone. The
  earlier updates are random pairs written into the history and added to the
  measured layer's sum untimed, as a run measured at every boundary would have them.
* ``boundary_vs_L``: one boundary of ``L`` layers (``--layer-width``²) after a few
  cascades, history in memory and metrics on.
* ``merged_state_dict``, ``save_merged``, ``export_exact``, ``export_rank_k``,
  ``inject_fp8``: against the model's size (``L`` layers of ``--layer-width``²), the
  time and the peak of new tensor memory (:class:`PeakOutputs`: the bytes of op
  outputs alive at once, CPU tensors; views not counted) of ``merged_state_dict()``,
  ``merged_state_dict(device="meta")`` (variant ``device``: each merged weight leaves the
  CPU at once), ``save_merged``, the exact and rank-``--rank`` PEFT exports after
  ``--cascades`` cascades, and ``inject_lorasc`` to fp8 e4m3.

Times are the median of ``--reps`` wall-clock runs (one for the long ``full_svd`` rows).
Output: a table on stdout and ``scaling-<HHMMSS>Z.csv`` in
``benchmarks/results/<device>-<YYYY-MM-DD>/`` (``--out DIR`` overrides). ``--quick``: tiny
sizes, seconds. Growth laws and the recorded run: ``docs/benchmarks.md``.

Usage: ``python -m benchmarks.bench_scaling [--quick] [--T 10,100,500] [--L 1,4,16]``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import statistics
import tempfile
import time
import weakref
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import RESULTS_DIR, device_name
from lorasc_kernels import Cascade, LoRASCConfig, inject_lorasc
from lorasc_kernels.cascade.lowrank import effective_rank, lowrank_svd, stacked

COLUMNS = [
    "family",
    "variant",
    "cascades",
    "layers",
    "width",
    "rank",
    "model_MiB",
    "ms",
    "peak_MiB",
]
MIB = 2**20


class PeakOutputs(TorchDispatchMode):
    """The peak bytes of op outputs alive at once (views share their base's and are not
    counted; with ``device_type``, only those on such devices): the temporaries a call
    makes."""

    def __init__(self, device_type: str | None = None):
        super().__init__()
        self.device_type = device_type  # count only outputs on devices of this type
        self.live = self.peak = 0

    def _freed(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(tensor, torch.Tensor) and self.device_type in (
                    None,
                    tensor.device.type,
                ):
                    size = tensor.untyped_storage().nbytes()
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(tensor, self._freed, size)
        return out


def median_ms(fn, reps: int) -> float:
    """Median wall-clock milliseconds of ``fn()`` over ``reps`` calls."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def model_and_cascade(layers: int, width: int, rank: int, history_dir=None):
    """``layers`` linears of ``width``² with rank-``rank`` LoRAs, one cascade per step,
    history kept (in ``history_dir`` when given), every boundary measured."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    inject_lorasc(model, LoRASCConfig(r=rank, lora_alpha=rank))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    cascade = Cascade(
        model, optimizer, steps_per_cascade=1, keep_history=True, history_dir=history_dir
    )
    cascade.track_metrics(every=1)
    return model, optimizer, cascade


def train_step(model, optimizer, width: int) -> None:
    model(torch.randn(4, width)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def boundary_ms(model, optimizer, cascade, width: int, reps: int) -> float:
    """Median time of ``cascade.step()`` ending a cascade (the training step untimed)."""
    times = []
    for _ in range(reps):
        train_step(model, optimizer, width)
        start = time.perf_counter()
        assert cascade.step()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def row(family, variant, cascades, layers, width, rank, ms, peak=None) -> dict:
    return {
        "family": family,
        "variant": variant,
        "cascades": cascades,
        "layers": layers,
        "width": width,
        "rank": rank,
        "model_MiB": round(layers * width * width * 4 / MIB, 3),
        "ms": round(ms, 3),
        "peak_MiB": "" if peak is None else round(peak / MIB, 3),
    }


def boundary_vs_t(counts, width, rank, reps, folder) -> list[dict]:
    rows = []
    for count in counts:
        generator = torch.Generator().manual_seed(count)
        pairs = [
            (
                torch.randn(width, rank, generator=generator),
                torch.randn(rank, width, generator=generator),
            )
            for _ in range(count)
        ]
        for variant in ("memory", "disk"):
            history_dir = Path(folder) / f"T{count}" if variant == "disk" else None
            model, optimizer, cascade = model_and_cascade(1, width, rank, history_dir)
            history = cascade.history["0"]
            for pair in pairs[:-1]:  # the T-th is the boundary's own
                history.append(pair)
            cascade.metrics._accumulated_sum(history)  # as measured at every boundary
            ms = boundary_ms(model, optimizer, cascade, width, reps)
            rows.append(row("boundary_vs_T", variant, count, 1, width, rank, ms))
            del model, optimizer, cascade, history
        ms = median_ms(lambda pairs=pairs: effective_rank(lowrank_svd(*stacked(pairs))[1]), 1)
        rows.append(row("boundary_vs_T", "full_svd", count, 1, width, rank, ms))
    return rows


def boundary_vs_l(layer_counts, width, rank, reps) -> list[dict]:
    rows = []
    for layers in layer_counts:
        model, optimizer, cascade = model_and_cascade(layers, width, rank)
        boundary_ms(model, optimizer, cascade, width, 2)  # a few cascades kept first
        ms = boundary_ms(model, optimizer, cascade, width, reps)
        rows.append(row("boundary_vs_L", "memory", cascade.cascade_index, layers, width, rank, ms))
    return rows


def measured(fn, reps: int, device_type: str | None = "cpu") -> tuple[float, int]:
    """``(median ms, peak bytes of new CPU tensors)`` of ``fn()``."""
    with PeakOutputs(device_type) as memory:
        fn()
    return median_ms(fn, reps), memory.peak


def against_size(layer_counts, width, rank, cascades, reps, folder) -> list[dict]:
    rows = []
    for layers in layer_counts:
        rows += size_rows(layers, width, rank, cascades, reps, Path(folder) / f"L{layers}")
    return rows


def size_rows(layers, width, rank, cascades, reps, out: Path) -> list[dict]:
    """The rows of the size families for ``layers`` layers (files written under ``out``)."""
    model, optimizer, cascade = model_and_cascade(layers, width, rank)
    cascade.track_metrics(every=0)
    for _ in range(cascades):
        train_step(model, optimizer, width)
        cascade.step()
    cases = {
        ("merged_state_dict", "whole"): lambda: cascade.merged_state_dict(),
        ("merged_state_dict", "device"): lambda: cascade.merged_state_dict(device="meta"),
        ("save_merged", "shards"): lambda: cascade.save_merged(
            out / "merged", max_shard_bytes=4 * width * width * 4
        ),
        ("export_exact", "memory"): lambda: cascade.export_peft_adapter(out / "exact"),
        ("export_rank_k", "memory"): lambda: cascade.export_peft_adapter(
            out / "rank_k", max_rank=rank
        ),
    }
    rows = []
    for (family, variant), fn in cases.items():
        ms, peak = measured(fn, reps)
        rows.append(row(family, variant, cascades, layers, width, rank, ms, peak))

    def inject():
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(width, width).bfloat16() for _ in range(layers)])
        with PeakOutputs("cpu") as memory:
            start = time.perf_counter()
            inject_lorasc(model, LoRASCConfig(r=rank, weight_format="fp8_e4m3"))
            return 1e3 * (time.perf_counter() - start), memory.peak

    ms, peak = min((inject() for _ in range(reps)), key=lambda result: result[0])
    rows.append(row("inject_fp8", "bf16->e4m3", 0, layers, width, rank, ms, peak))
    return rows


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: seconds")
    parser.add_argument("--T", default="10,100,500", help="run lengths of boundary_vs_T")
    parser.add_argument("--L", default="1,4,16", help="layer counts of the size families")
    parser.add_argument("--width", type=int, default=1024, help="boundary_vs_T layer width")
    parser.add_argument("--layer-width", type=int, default=512, help="width of the L layers")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--cascades", type=int, default=8, help="cascades before exports")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    counts = [int(v) for v in args.T.split(",")]
    layer_counts = [int(v) for v in args.L.split(",")]
    width, layer_width, rank, cascades = args.width, args.layer_width, args.rank, args.cascades
    if args.quick:
        counts, layer_counts = [2, 6], [1, 3]
        width, layer_width, rank, cascades = 32, 24, 2, 3
    if min(counts) < 1 or min(layer_counts) < 1:
        parser.error("--T and --L take positive ints")
    now = datetime.datetime.now(datetime.timezone.utc)
    out = args.out or RESULTS_DIR / f"{device_name('cpu')}-{now:%Y-%m-%d}"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        rows += boundary_vs_t(counts, width, rank, args.reps, folder)
        rows += boundary_vs_l(layer_counts, layer_width, rank, args.reps)
        rows += against_size(layer_counts, layer_width, rank, cascades, args.reps, folder)
    path = out / f"scaling-{now:%H%M%S}Z.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(" | ".join(COLUMNS))
    for entry in rows:
        print(" | ".join(str(entry[column]) for column in COLUMNS))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
