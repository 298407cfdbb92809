"""Helpers shared by the benchmark scripts: timing, device naming, CSV output."""

from __future__ import annotations

import csv
import gc
import importlib
import importlib.metadata
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example_module(name: str):
    """``examples/<name>.py`` imported as a module (its data, settings and training code);
    ``examples/`` is on ``sys.path`` for the import only."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))


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


def time_interleaved_calls_ms(
    fns: dict, rounds: int = 5, reps: int = 3, warmup: int = 2
) -> dict[str, list[list[float]]]:
    """Wall-clock milliseconds of each call of each of ``fns`` (name → callable), timed in
    turns: ``{name: [round 0's reps times, round 1's, ...]}``.

    For CPUs shared with other work: each round times ``reps`` calls of every function,
    in an order rotated by one each round, so a burst of outside load falls on all of them
    alike instead of on whichever ran then. Python's garbage collector is paused while
    timing, as ``timeit`` does.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times = {name: [[] for _ in range(rounds)] for name in names}
    collecting = gc.isenabled()
    gc.disable()
    try:
        for round_index in range(rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                for _ in range(reps):
                    start = time.perf_counter()
                    fns[name]()
                    times[name][round_index].append((time.perf_counter() - start) * 1e3)
    finally:
        if collecting:
            gc.enable()
    return times


def time_interleaved_ms(fns: dict, rounds: int = 5, reps: int = 3, warmup: int = 2) -> dict:
    """Median wall-clock milliseconds of each of ``fns`` over all ``rounds × reps`` calls of
    :func:`time_interleaved_calls_ms`."""
    times = time_interleaved_calls_ms(fns, rounds, reps, warmup)
    return {name: median_of_calls(by_round) for name, by_round in times.items()}


def median_of_calls(by_round: list[list[float]]) -> float:
    """The median over every call of every round of :func:`time_interleaved_calls_ms`."""
    return statistics.median(value for calls in by_round for value in calls)


def paired_ratio(by_round: list[list[float]], baseline_by_round: list[list[float]]) -> float:
    """The median over rounds of (this round's median ÷ the baseline's median in the same
    round), from :func:`time_interleaved_calls_ms`: a comparison in one run that a drift of
    the machine's speed between rounds moves less than a ratio of two overall medians."""
    return statistics.median(
        statistics.median(calls) / statistics.median(baseline)
        for calls, baseline in zip(by_round, baseline_by_round, strict=True)
    )


def time_all_ms(fns: dict, device: str, quick: bool = False) -> dict:
    """Median milliseconds of each of ``fns``: ``do_bench`` one by one on GPU, in turns on
    CPU; a quick CPU run times each once (a smoke test: its times mean little)."""
    if device.startswith("cuda"):
        return {name: time_ms(fn, device) for name, fn in fns.items()}
    if quick:
        return time_interleaved_ms(fns, rounds=1, reps=1, warmup=0)
    return time_interleaved_ms(fns)


def peak_memory_mib(fn, device: str) -> float | None:
    """Peak CUDA memory that ``fn()`` allocates above what was allocated before, in MiB.

    ``None`` on CPU, where torch keeps no allocator statistics.
    """
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def significant(value: float | None, digits: int = 4) -> float | None:
    """``value`` rounded to ``digits`` significant digits (None stays None)."""
    return None if value is None else float(f"{value:.{digits}g}")


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A fixed-width text table of ``rows`` over ``columns`` (missing or None cells blank)."""
    cells = [[("" if row.get(c) is None else str(row[c])) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in cells]
    return "\n".join(lines)


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def result_row(
    family: str,
    problem,
    provider: str,
    mode: str,
    ms: float,
    flops: float,
    floor_ms: float | None,
    peak_mib: float | None = None,
) -> dict:
    """One CSV row of the linear or layer family; units are in the column names."""
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "device": device_name(problem.device),
        "family": family,
        "provider": provider,
        "mode": mode,
        "M": problem.M,
        "K": problem.K,
        "N": problem.N,
        "r": problem.r,
        "dtype": problem.dtype_name,
        "median_ms": significant(ms),
        "tflop_per_s": significant(flops / (ms * 1e-3) / 1e12),
        "ratio_to_floor": significant(ms / floor_ms, 3) if floor_ms else None,
        "peak_mem_MiB": significant(peak_mib),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
    }


def device_ceilings(device: str, quick: bool = False) -> dict:
    """The two ceilings of the device: copy bandwidth and bf16 matmul rate, measured.

    Copy: ``dst.copy_(src)`` of 1 GiB (bytes read plus written count). Matmul: an
    8192³ bf16 product on random data (fp32 256³ on CPU with ``quick``).
    """
    big = device.startswith("cuda") or not quick
    copy_bytes = 2**30 if big else 2**24
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device)
    size, dtype = (8192, torch.bfloat16) if big else (256, torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    matmul_ms = time_ms(lambda: a @ b, device)
    return {
        "device": device_name(device),
        "copy_GB_per_s": significant(2 * copy_bytes / (copy_ms * 1e-3) / 1e9),
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "matmul_size": size,
        "matmul_tflop_per_s": significant(2 * size**3 / (matmul_ms * 1e-3) / 1e12),
    }


def family_main(run, description: str, quick_help: str) -> None:
    """The command line of a family script: ``[--quick] [--device] [--out-dir]``, then a table.

    ``run(quick, device, out_dir) -> rows`` is the family's entry point.
    """
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    arguments = parser.parse_args()
    rows = run(arguments.quick, arguments.device, arguments.out_dir)
    print(format_table(rows, list(rows[0])))
