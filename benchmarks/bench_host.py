"""Host cost of one LoRA layer's forward+backward per call: time, aten ops, Triton launches.

Problem: ``x`` (M, K) through a rank-r LoRA of a frozen (N, K) weight, M = 16 and 64 with
K = N = 64, r=16 by default (fp32 on the CPU, bf16 on a GPU): so small that the device
work is negligible and what is measured is what the host does to issue it. One call is
``benchmarks.bench_linear.step_fn("forward+backward", ...)``: gradients reset, forward,
backward with a fixed ``dY``. Providers:

* ``floor``, ``addmm``, ``compile``: as in :mod:`benchmarks.providers` (``compile`` is
  skipped on the CPU, its inductor build taking 10 s+, unless ``--compile``);
* ``ours-<backend>``: ``LoRASCLinear.from_linear(..., backend=...)`` for ``torch``,
  ``triton`` and ``cuda``, as ``providers.build`` makes them (no hooks: a forced GEMM
  variant is the dispatch's mode, set around each call); a backend that cannot
  run here is a row with its reason in ``skipped``.

Columns, per call: ``host_us``, the median over ``--calls`` calls of ``perf_counter``
around one call, no device sync (the providers are timed in turns, :data:`ROUNDS` rounds,
by :func:`benchmarks.common.time_interleaved_calls_ms`; on a GPU, keep the problem small,
so that the device does not hold the host back); ``vs_addmm``, the provider's host time
over ``addmm``'s in the same run, as the median over rounds of the per-round ratio
(:func:`benchmarks.common.paired_ratio`: a drift of the machine's speed during the run
moves it less than the ratio of two ``host_us``), empty without an ``addmm`` row;
``aten_ops``, every op that a :class:`OpCounter` (a ``TorchDispatchMode``) sees, views
included, of which ``view_ops`` views and ``host_read_ops`` ops that read a device value on
the host (:func:`is_host_read`, a sync on a GPU); ``triton_launches``
(:class:`LaunchCounter`); ``python_calls``, the Python function calls of one call, of which
``package_calls`` into ``lorasc_kernels`` (:class:`PythonCallCounter`: a count that the
machine's load does not move, where ``host_us`` does; the stubs' own calls are in
``python_calls`` only); on a GPU ``cuda_syncs``, the synchronizing calls that
``torch.cuda.set_sync_debug_mode("warn")`` reports.

On the CPU the Triton kernels would run in the interpreter, which adds its own aten ops
and milliseconds per launch; there every ``*_kernel`` launch point of
``lorasc_kernels/backends/triton/*.py`` is replaced by a stub that counts the launch and
runs nothing (``launches_stubbed``; outputs are then left uninitialised, which a host
benchmark does not read). The host work around the launches (argument checks, output
allocation, scalars) is kept and counted. The ``compile`` row counts the ops that the
compiled artifact dispatches (:meth:`OpCounter.ignore_compile_internals`: Dynamo would
otherwise fall back to eager code under the mode); inductor's own buffer allocations do not
go through the dispatcher and are not counted.

On the CPU the ops run on one thread (``--threads``): they are tiny, and on a shared machine
waking a second thread for each can cost milliseconds, more than the ops themselves.

Output: a table on stdout and ``host-<HHMMSS>Z.csv`` in
``benchmarks/results/<device>-<YYYY-MM-DD>/`` (UTC; ``--out DIR`` overrides the folder).

Usage: ``python -m benchmarks.bench_host [--M 16,64 --K 64 --N 64 --r 16] [--calls 200]``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import importlib
import importlib.util
import os
import pkgutil
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import providers
from benchmarks.bench_linear import step_fn
from benchmarks.common import (
    RESULTS_DIR,
    device_name,
    format_table,
    median_of_calls,
    paired_ratio,
    significant,
    time_interleaved_calls_ms,
)
from benchmarks.providers import Problem, Tensors

__all__ = [
    "PROVIDERS",
    "COLUMNS",
    "HOST_READ_OPS",
    "is_host_read",
    "OpCounter",
    "LaunchCounter",
    "launch_points",
    "SyncCounter",
    "PythonCallCounter",
    "measure",
    "main",
]

PROVIDERS = ("floor", "addmm", "compile", "ours-torch", "ours-triton", "ours-cuda")
# Rounds of the interleaved timing (benchmarks.common.time_interleaved_calls_ms): ``--calls``
# calls per provider are split into this many turns (fewer when there are fewer calls).
ROUNDS = 20

COLUMNS = [
    "date_utc",
    "device",
    "provider",
    "M",
    "K",
    "N",
    "r",
    "dtype",
    "host_us",
    "vs_addmm",
    "calls",
    "aten_ops",
    "view_ops",
    "host_read_ops",
    "triton_launches",
    "python_calls",
    "package_calls",
    "launches_stubbed",
    "cuda_syncs",
    "skipped",
    "threads",
    "torch",
    "triton",
]

# Ops whose result the host needs (``.item()``, ``bool(t)``, data-dependent shapes): each
# one waits for the GPU. By schema name.
HOST_READ_OPS = frozenset(
    {
        "aten::_local_scalar_dense",
        "aten::is_nonzero",
        "aten::item",
        "aten::equal",
        "aten::nonzero",
        "aten::masked_select",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
        "aten::unique_dim_consecutive",
        "aten::bincount",
    }
)


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in ``value`` (a tensor, or a list or tuple holding some)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def is_host_read(func, args, kwargs, out) -> bool:
    """Whether the op ``func(*args, **kwargs) -> out`` reads device data on the host: one
    of :data:`HOST_READ_OPS`, indexing by a boolean mask (a hidden ``nonzero``), or a copy
    from a CUDA tensor to a CPU one."""
    if func._schema.name in HOST_READ_OPS:
        return True
    inputs = _tensors(list(args) + list(kwargs.values()))
    if func._schema.name in ("aten::index", "aten::index_put", "aten::index_put_"):
        if any(t.dtype in (torch.bool, torch.uint8) for t in _tensors(args[1:2])):
            return True
    on_gpu = any(t.device.type == "cuda" for t in inputs)
    return on_gpu and any(t.device.type == "cpu" for t in _tensors(out))


class OpCounter(TorchDispatchMode):
    """Every aten op dispatched while active, in order (views included).

    ``with OpCounter() as ops: fn()``, then ``ops.count``, ``ops.views``,
    ``ops.host_reads`` and ``ops.names`` (``"aten.mm.default"``...). Active in the autograd
    engine's threads too (torch carries dispatch modes into backward). A compiled
    (``torch.compile``) artifact runs compiled under it: :meth:`ignore_compile_internals`.
    """

    def __init__(self):
        super().__init__()
        self.names: list[str] = []
        self.views = 0
        self.host_reads = 0

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        """Let compiled code run as compiled and count the ops it dispatches (by default
        Dynamo skips its frames under a dispatch mode and the eager ops would be counted)."""
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.names.append(str(func))
        self.views += bool(func.is_view)
        self.host_reads += is_host_read(func, args, kwargs, out)
        return out

    @property
    def count(self) -> int:
        """Ops seen so far."""
        return len(self.names)

    def by_name(self) -> collections.Counter:
        """Op name → times seen."""
        return collections.Counter(self.names)


def launch_points() -> list[tuple[object, str]]:
    """``(module, name)`` of every Triton kernel the backend launches: the ``*_kernel``
    attributes of ``lorasc_kernels.backends.triton``'s modules (imported here; none without
    Triton). A kernel already replaced by an active :class:`LaunchCounter` counts as one."""
    try:
        from triton.runtime.jit import KernelInterface
    except ImportError:
        return []
    package = importlib.import_module("lorasc_kernels.backends.triton")
    points = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        points += [
            (module, name)
            for name, value in vars(module).items()
            if name.endswith("_kernel") and isinstance(value, (KernelInterface, _CountedKernel))
        ]
    return points


class _CountedKernel:
    """Stands in for a kernel at its launch point: ``kernel[grid](...)`` counts, then runs
    the real launch unless ``stub``."""

    def __init__(self, counter: LaunchCounter, name: str, kernel):
        self.counter, self.name, self.kernel = counter, name, kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counter.by_kernel[self.name] += 1
            if not self.counter.stub:
                return self.kernel[grid](*args, **kwargs)
            return None

        return launch


class LaunchCounter:
    """Counts the Triton launches made while active, per kernel; with ``stub`` they run
    nothing and allocate nothing (their outputs keep whatever ``torch.empty`` gave).

    ``with LaunchCounter(stub=True) as launches: fn()``, then ``launches.count`` and
    ``launches.by_kernel``. Replaces the kernels at the launch points of
    :func:`launch_points` and puts them back on exit.
    """

    def __init__(self, stub: bool = False):
        self.stub = stub
        self.by_kernel: collections.Counter = collections.Counter()
        self._saved: list[tuple[object, str, object]] = []

    @property
    def count(self) -> int:
        """Launches so far."""
        return sum(self.by_kernel.values())

    def __enter__(self) -> LaunchCounter:
        for module, name in launch_points():
            kernel = getattr(module, name)
            self._saved.append((module, name, kernel))
            setattr(module, name, _CountedKernel(self, name, kernel))
        return self

    def __exit__(self, *exc) -> None:
        for module, name, kernel in reversed(self._saved):
            setattr(module, name, kernel)
        self._saved.clear()


class PythonCallCounter:
    """The Python function calls made on this thread while active (``sys.setprofile``):
    ``count`` in all, ``package`` into ``lorasc_kernels``' own files. Deterministic where a
    time is not: each call is a frame, its arguments bound, its locals made (a few hundred
    nanoseconds of host time apiece), whatever the load of the machine."""

    _PACKAGE = str(Path(importlib.util.find_spec("lorasc_kernels").origin).parent)

    def __init__(self):
        self.count = 0
        self.package = 0

    def _profile(self, frame, event, arg) -> None:
        if event == "call":
            self.count += 1
            self.package += frame.f_code.co_filename.startswith(self._PACKAGE)

    def __enter__(self) -> PythonCallCounter:
        self._previous = sys.getprofile()
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(self._previous)


class SyncCounter:
    """On a GPU, the synchronizing CUDA calls made while active, as reported by
    ``torch.cuda.set_sync_debug_mode("warn")`` (``count``); None elsewhere."""

    def __init__(self, device: str):
        self.active = device.startswith("cuda")
        self.count: int | None = None

    def __enter__(self) -> SyncCounter:
        if self.active:
            self._previous = torch.cuda.get_sync_debug_mode()
            self._catch = warnings.catch_warnings(record=True)
            self._caught = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            torch.cuda.set_sync_debug_mode(self._previous)
            self._catch.__exit__(*exc)
            self.count = sum("synchroniz" in str(w.message) for w in self._caught)


def _build(name: str, tensors: Tensors, compile_on_cpu: bool) -> torch.nn.Module:
    if name == "compile" and tensors.x.device.type == "cpu" and not compile_on_cpu:
        raise providers.ProviderUnavailable("inductor build of 10 s+ on the CPU (--compile)")
    return providers.build(name, tensors)


def _count(fn, device: str, stub: bool) -> tuple:
    """Ops, Triton launches, syncs and Python calls of one call of ``fn`` (the Python calls
    on a call of their own: a dispatch mode runs Python code per op)."""
    with LaunchCounter(stub) as launches, SyncCounter(device) as syncs, OpCounter() as ops:
        fn()
    with LaunchCounter(stub), PythonCallCounter() as calls:
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return ops, launches, syncs, calls


def measure(
    problem: Problem, names=PROVIDERS, calls: int = 2000, compile_on_cpu: bool = False
) -> list[dict]:
    """One row per provider of ``names`` on ``problem`` (module docstring); a provider that
    cannot run here gets a row with its reason in ``skipped``."""
    tensors = Tensors.draw(problem)
    device = problem.device
    stub = not device.startswith("cuda")  # interpreted launches: stubbed (module docstring)
    fns, skipped = {}, {}
    for name in names:
        try:
            fns[name] = step_fn("forward+backward", _build(name, tensors, compile_on_cpu), tensors)
        except providers.ProviderUnavailable as error:
            skipped[name] = str(error).splitlines()[0]
    with LaunchCounter(stub) if stub else contextlib.nullcontext():
        for fn in fns.values():  # first calls: compiles, autotuning, the dispatch's choice
            fn()
        counts = {name: _count(fn, device, stub) for name, fn in fns.items()}
        rounds = max(1, min(ROUNDS, calls))
        times = time_interleaved_calls_ms(
            fns, rounds=rounds, reps=max(1, calls // rounds), warmup=3
        )
    common = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "device": device_name(device),
        "M": problem.M,
        "K": problem.K,
        "N": problem.N,
        "r": problem.r,
        "dtype": problem.dtype_name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _triton_version(),
    }
    rows = []
    for name in names:
        row = dict.fromkeys(COLUMNS) | common | {"provider": name}
        if name in skipped:
            row["skipped"] = skipped[name]
        else:
            ops, launches, syncs, python = counts[name]
            row |= {
                "host_us": significant(median_of_calls(times[name]) * 1e3),
                "vs_addmm": None
                if "addmm" not in times
                else significant(paired_ratio(times[name], times["addmm"])),
                "calls": rounds * max(1, calls // rounds),
                "aten_ops": ops.count,
                "view_ops": ops.views,
                "host_read_ops": ops.host_reads,
                "triton_launches": launches.count,
                "python_calls": python.count,
                "package_calls": python.package,
                "launches_stubbed": stub,
                "cuda_syncs": syncs.count,
            }
        rows.append(row)
    return rows


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def write_csv(rows: list[dict], folder: Path) -> Path:
    """``rows`` as ``folder/host-<HHMMSS>Z.csv`` (written whole, then renamed into place)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / time.strftime("host-%H%M%SZ.csv", time.gmtime())
    partial = path.with_suffix(".csv.partial")
    with partial.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    partial.replace(path)
    return path


def main(argv=None) -> None:
    """Command line (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--M", default="16,64", help="rows, comma-separated (16: decode- and inference-sized)"
    )
    parser.add_argument("--K", type=int, default=64)
    parser.add_argument("--N", type=int, default=64)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None)
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per provider")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--compile", action="store_true", help="build torch.compile on a CPU")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    parser.add_argument("--out", type=Path, default=None, help="folder of the CSV")
    args = parser.parse_args(argv)
    if not args.device.startswith("cuda"):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on CPU tensors: interpreted
        torch.set_num_threads(args.threads)
    default = "bf16" if args.device.startswith("cuda") else "fp32"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or default
    ]
    names = [name for name in args.providers.split(",") if name]
    unknown = set(names) - set(PROVIDERS)
    if unknown:
        parser.error(f"unknown providers {sorted(unknown)}; known: {', '.join(PROVIDERS)}")
    rows = []
    for m in (int(value) for value in args.M.split(",") if value):
        problem = Problem(m, args.K, args.N, args.r, dtype, args.device)
        rows += measure(problem, names, args.calls, args.compile)
    folder = args.out or RESULTS_DIR / (
        f"{device_name(args.device)}-{time.strftime('%Y-%m-%d', time.gmtime())}"
    )
    print(format_table(rows, ["M", "provider", *COLUMNS[COLUMNS.index("host_us") : -3]]))
    print(f"wrote {write_csv(rows, folder)}", flush=True)


if __name__ == "__main__":
    main()
