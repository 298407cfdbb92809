"""``python -m benchmarks``: run the benchmark families, write CSV + plot, print tables.

    python -m benchmarks [--quick | --full] [--device cpu|cuda] [--out DIR]
                         [--only linear,layer,merge,precision,expressiveness,forgetting]
                         [--threads N] [--skip-backends cuda] [--problems all|headline|rest]
    python -m benchmarks --summary DIR_OR_CSV ...  # short tables (and plot) of saved results
    python -m benchmarks --ceilings [--device ...] # the device's copy GB/s and matmul TFLOP/s

Rows of the linear and layer families go to ``<out>/<device>.csv`` (appended; units in
the column names) and their plot to ``<out>/<device>.png``; the merge and precision
families write their own CSV files into ``<out>`` (their tables are printed here).
Without ``--out``, results go to ``benchmarks/results/``, except quick runs, which go to
a temporary folder.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from .common import RESULTS_DIR, append_csv, device_ceilings, device_name, format_table

FAMILIES = {
    "linear": "benchmarks.bench_linear",
    "layer": "benchmarks.bench_layer",
    "merge": "benchmarks.bench_merge",
    "precision": "benchmarks.merge_precision",
    "expressiveness": "benchmarks.bench_expressiveness",
    "forgetting": "benchmarks.bench_forgetting",
}
# Families run only when --only names them (forgetting: about 30 minutes on a CPU thread).
ON_REQUEST = ("forgetting",)
# Families whose rows share the linear family's columns (one CSV, one plot).
RATIO_FAMILIES = ("linear", "layer")
TABLE_COLUMNS = [
    "family",
    "mode",
    "M",
    "K",
    "N",
    "r",
    "dtype",
    "provider",
    "median_ms",
    "tflop_per_s",
    "ratio_to_floor",
    "peak_mem_MiB",
]
SUMMARY_MODE = "forward+backward"
# Rows of a non-ratio CSV that --summary prints; the rest are counted, and the file named.
SUMMARY_ROWS = 40


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny sizes, end to end in seconds")
    size.add_argument(
        "--full",
        action="store_true",
        help="the whole GPU matrix (default: the reduced one of gpu_check.sh)",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--out", type=Path, help="folder of the CSV and PNG files")
    parser.add_argument(
        "--only",
        default=",".join(name for name in FAMILIES if name not in ON_REQUEST),
        help=f"comma-separated families among {','.join(FAMILIES)} (default: all but "
        f"{','.join(ON_REQUEST)})",
    )
    parser.add_argument(
        "--skip-backends",
        default="",
        metavar="NAMES",
        help="comma-separated backends of ours not to run (e.g. cuda)",
    )
    parser.add_argument(
        "--problems",
        choices=("all", "headline", "rest"),
        default="all",
        help="linear and layer families: all problems, only the headline "
        "one (bf16 M=8192 K=N=4096 r=16 on a GPU), or all but it",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads of CPU runs (default 2; 1 with --quick, whose "
        "tiny products only wait on a second thread)",
    )
    parser.add_argument(
        "--summary",
        type=Path,
        nargs="+",
        metavar="PATH",
        help="print the short tables of these CSV files (or of the CSV files "
        "in these folders), re-plot the ratio ones, and exit",
    )
    parser.add_argument(
        "--ceilings",
        action="store_true",
        help="measure the device's copy bandwidth and matmul rate, and exit",
    )
    args = parser.parse_args(argv)
    args.families = [name.strip() for name in args.only.split(",") if name.strip()]
    args.skip_backends = [name.strip() for name in args.skip_backends.split(",") if name.strip()]
    unknown = sorted(set(args.families) - set(FAMILIES))
    if unknown:
        parser.error(f"--only: unknown families {unknown}; choose among {list(FAMILIES)}")
    return args


def ratio_pivot(rows: list[dict], mode: str = SUMMARY_MODE) -> str:
    """One line per problem, one column per provider: time / floor time in ``mode``."""
    rows = [row for row in rows if row.get("mode") == mode]
    names = list(dict.fromkeys(row["provider"] for row in rows))
    lines = {}
    for row in rows:
        key = (row["family"], f"{row['M']}x{row['K']}x{row['N']}", row["r"], row["dtype"])
        line = lines.setdefault(key, dict(zip(("family", "MxKxN", "r", "dtype"), key, strict=True)))
        line[row["provider"]] = row["ratio_to_floor"]
        if row["provider"] == "floor":
            line["floor_ms"] = row["median_ms"]
    columns = ["family", "MxKxN", "r", "dtype", "floor_ms", *names]
    return f"time / floor time, {mode}:\n" + format_table(list(lines.values()), columns)


def latest_rows(rows: list[dict]) -> list[dict]:
    """The last row of each (family, mode, problem, provider): a CSV appended to by several
    runs keeps its history, tables and plots show the latest."""
    keys = ("family", "mode", "M", "K", "N", "r", "dtype", "provider")
    return list({tuple(row[key] for key in keys): row for row in rows}.values())


def summarize(paths: list[Path]) -> None:
    """Print the short table of each CSV file (folders: their CSV files), the ratio ones
    last and re-plotted beside their CSV."""
    from .plot import plot_ratios

    files = [f for p in paths for f in (sorted(p.glob("*.csv")) if p.is_dir() else [p])]
    tables = {}
    for path in files:
        with path.open(newline="") as handle:
            tables[path] = list(csv.DictReader(handle))
    for path, rows in sorted(tables.items(), key=lambda item: is_ratio_table(item[1])):
        if not rows:
            continue
        if is_ratio_table(rows):
            rows = latest_rows(rows)
            dates = sorted(row["date_utc"] for row in rows)
            png = plot_ratios(
                rows, path.with_suffix(".png"), f"{path.stem}, {dates[0]} to {dates[-1]} UTC"
            )
            modes = [
                mode
                for mode in ("forward", SUMMARY_MODE)
                if any(row["mode"] == mode for row in rows)
            ]
            pivots = "\n".join(ratio_pivot(rows, mode) for mode in modes)
            print(f"{path} (plot: {png})\n{pivots}\n")
        else:
            print(f"{path}\n{format_table(rows[:SUMMARY_ROWS], list(rows[0]))}")
            if len(rows) > SUMMARY_ROWS:
                report = path.with_suffix(".md")
                where = f"; its report: {report}" if report.exists() else ""
                print(f"... {len(rows) - SUMMARY_ROWS} more rows in {path}{where}")
            print()


def is_ratio_table(rows: list[dict]) -> bool:
    """Whether ``rows`` are of the linear or layer family (they have a ratio to the floor)."""
    return bool(rows) and "ratio_to_floor" in rows[0]


def run_family(name: str, args) -> list[dict] | None:
    """Rows of family ``name``; None (with a printed reason) when it is absent or fails."""
    try:
        module = importlib.import_module(FAMILIES[name])
    except ModuleNotFoundError as error:
        if error.name != FAMILIES[name]:
            raise
        print(f"skip {name}: {FAMILIES[name]} is not there yet", flush=True)
        return None
    kwargs = {}
    if name in RATIO_FAMILIES:
        csv_path = args.out / f"{device_name(args.device)}.csv"
        kwargs = {
            "full": args.full,
            "skip_backends": args.skip_backends,
            "sink": lambda rows: append_csv(rows, csv_path),
            "selection": args.problems,
        }
    elif name == "merge":
        kwargs = {"skip_backends": args.skip_backends}
    start = time.perf_counter()
    rows = module.run(quick=args.quick, device=args.device, out_dir=args.out, **kwargs)
    print(f"{name}: {len(rows)} rows in {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summary:
        summarize(args.summary)
        return 0
    if args.device == "cpu":
        torch.set_num_threads(args.threads or (1 if args.quick else 2))
        if args.quick:  # before any Triton kernel is defined: they then run interpreted
            os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.out is None:
        args.out = Path(tempfile.gettempdir(), "lorasc_bench_quick") if args.quick else RESULTS_DIR
    device = device_name(args.device)
    if args.ceilings:
        ceilings = device_ceilings(args.device, args.quick)
        print(format_table([ceilings], list(ceilings)))
        return 0
    print(
        f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"results in {args.out}",
        flush=True,
    )

    ratio_rows, failed = [], []
    for name in args.families:
        try:
            rows = run_family(name, args)
        except Exception:  # report and go on with the other families
            traceback.print_exc()
            failed.append(name)
            continue
        if not rows:
            continue
        if name in RATIO_FAMILIES:
            ratio_rows += rows  # already in the CSV, problem by problem
        else:
            print(format_table(rows, list(rows[0])), flush=True)

    if ratio_rows:
        from .plot import plot_ratios

        png = plot_ratios(
            ratio_rows,
            args.out / f"{device}.png",
            f"{device}, torch {torch.__version__}, {ratio_rows[0]['date_utc']} UTC",
        )
        print(format_table(ratio_rows, TABLE_COLUMNS))
        print(f"\nwrote {args.out / f'{device}.csv'}" + (f" and {png}" if png else "") + "\n")
        print(ratio_pivot(ratio_rows), flush=True)
    if failed:
        print(f"failed families: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
