"""A profiling run of the training step and the merge that fits a few minutes of GPU time.

Where the time goes, per (problem, provider, mode): kernels or the host. Usage, from the
repository root: ``python -m benchmarks.profile_gpu [--out DIR] [--budget-s 210]`` on a
GPU; ``--dry`` (automatic without CUDA) runs the same code on the CPU, Triton interpreted,
on tiny shapes, skipping only what needs CUDA (``do_bench``, the profiler's CUDA activity,
CUDA graphs), so that a Python error shows there first.

Linear problems, in this order, the merge between them (most needed first; a cut run keeps
what ran): bf16 M=8192 K=N=4096 r=16, then fp16 M=K=N=4096 r=16 (dry: M=64 K=32 N=48 r=4,
bf16 then fp16). Providers (:data:`PROVIDERS`): ``floor`` (frozen ``nn.Linear``),
``addmm`` and ``compile`` (``torch.compile`` of the unfused layer) from
:mod:`benchmarks.providers`; ``LoRASCLinear`` on Triton with its GEMM variant forced,
``ours-triton@tiled`` and ``ours-triton@persistent``, or chosen by the dispatch,
``ours-triton``; and ``ours-triton+cudagraph``, the dispatched layer's step captured once in a
CUDA graph and replayed (a capture that fails leaves its error in the row). Modes
(:data:`MODES`): ``forward``, ``backward`` (of one retained forward), ``forward+backward``,
``train step`` (forward, backward, AdamW on the LoRA factors; capturable AdamW in the graph;
the floor has no step). Merge (:func:`profile_merge`): a W of 4096² and 8192² (dry: 16²,
32²), r=16, bf16 and fp8 e4m3 codes with row scales: ``copy`` (a device copy of W's
codes), ``merge_lowrank_`` (the full call, Triton backend) and ``merge kernel`` (the Triton
launcher ``backends.triton.merge.merge_`` alone, no checks); the coefficient alternates
sign so W stays bounded over thousands of calls.

Pinned, so nothing is tuned or measured that a row does not time: each Triton GEMM
autotuner keeps the one config :data:`PINNED_TILE` (with one config Triton times nothing),
and the GEMM variant is the dispatch's mode (``gemm_dispatch.forced_mode``) for the whole
of a row, whatever the provider (None, the default, for the dispatch, which then times its
candidates at the row's first call, before any timing).

Columns per row: ``bench_ms`` (``triton.testing.do_bench`` median; dry: one call timed
by ``perf_counter``), ``vs_floor`` (``bench_ms`` over the floor's in the same problem and
mode; not ``ratio_to_floor``, which ``python -m benchmarks --summary`` reads as a family
table's), ``host_ms`` (host time per call over back-to-back calls, ``perf_counter``, no
sync between them), and from ``torch.profiler`` over 3 back-to-back calls, per call:
``gpu_kernel_ms`` (device time of kernels, copies and memsets), ``gpu_busy_ms`` (union of
their intervals), ``gpu_span_ms`` (first start to last end), ``gpu_busy_fraction`` = busy /
span (below 1: the GPU waited for the host), ``kernels_per_call``, ``kernel_ms`` (the
longest kernels, ``name=ms``), ``syncs_per_call`` (host waits: ``cudaDeviceSynchronize``,
``cudaStreamSynchronize``, ``cudaEventSynchronize``, ``cudaMemcpy``). Merge rows add
``bandwidth_GBps`` (one read and one write of W's bytes, scales included) and
``bandwidth_vs_copy``. ``error``: ``failed: ...`` (the run then exits 1), ``no graph: ...``,
or ``skipped: ...``: the provider cannot run here, or ``--budget-s`` (default 210 s from
the first build, so that start-up and the last row still end within 240 s) was spent
before the row or the provider's build began. Rows of family ``dispatch`` name the
dispatch's choices. Versions (torch, Triton, CUDA, driver) and the pinned config are
columns of every row.

Output: one CSV, ``profile-<HHMMSS>Z.csv`` in ``benchmarks/results/<card>-<YYYY-MM-DD>/``
(card: ``torch.cuda.get_device_name`` with spaces as ``_``; UTC), ``--out DIR`` overrides
the folder; written and flushed row by row.
"""

from __future__ import annotations

import argparse
import collections
import csv
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

if __name__ == "__main__" and ("--dry" in sys.argv or not torch.cuda.is_available()):
    # Before lorasc_kernels imports Triton, whose libdevice is chosen at import (interpreted
    # kernels calling the CUDA one fail).
    os.environ["TRITON_INTERPRET"] = "1"

from benchmarks import providers  # noqa: E402
from benchmarks.bench_layer import train_step_fn  # noqa: E402
from benchmarks.bench_linear import clear_grads  # noqa: E402
from benchmarks.common import RESULTS_DIR, device_name, significant  # noqa: E402
from benchmarks.providers import Problem, Tensors  # noqa: E402
from lorasc_kernels import merge_lowrank_  # noqa: E402
from lorasc_kernels.backends.specs import MergeSpec  # noqa: E402
from lorasc_kernels.formats.quantize import format_dtype, quantize  # noqa: E402

__all__ = ["PROVIDERS", "MODES", "COLUMNS", "PINNED_TILE", "main"]

GRAPH = "ours-triton+cudagraph"
PROVIDERS = (
    "floor",
    "addmm",
    "compile",
    "ours-triton@tiled",
    "ours-triton@persistent",
    "ours-triton",
    GRAPH,
)
MODES = ("forward", "backward", "forward+backward", "train step")
MERGE_PROVIDERS = ("copy", "merge_lowrank_", "merge kernel")
MERGE_FORMATS = ("bf16", "fp8_e4m3")
MERGE_RANK = 16
# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) kept by both GEMM autotuners: the
# first of their 16-bit Hopper configs (lorasc_kernels/backends/triton/configs.py).
PINNED_TILE = (128, 256, 64, 3, 8)
SYNC_CALLS = (
    "cudaDeviceSynchronize",
    "cudaStreamSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpy",
)
PROFILED_CALLS = 3
COLUMNS = [
    "family",
    "problem",
    "provider",
    "mode",
    "variant",
    "M",
    "K",
    "N",
    "r",
    "dtype",
    "bench_ms",
    "timer",
    "vs_floor",
    "host_ms",
    "gpu_kernel_ms",
    "gpu_busy_ms",
    "gpu_span_ms",
    "gpu_busy_fraction",
    "kernels_per_call",
    "syncs_per_call",
    "bandwidth_GBps",
    "bandwidth_vs_copy",
    "kernel_ms",
    "error",
    "note",
    "elapsed_s",
    "device",
    "date_utc",
    "torch",
    "triton",
    "cuda",
    "driver",
    "triton_config",
]


class NoGraph(RuntimeError):
    """A step that could not be captured in a CUDA graph (a row's finding, not a failure)."""


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _driver_version() -> str | None:
    """The NVIDIA driver's version from ``nvidia-smi``, or None."""
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.splitlines()[0].strip() if result.returncode == 0 else None


def _tile(config) -> tuple[int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps)`` of a GEMM ``triton.Config``."""
    k = config.kwargs
    return (k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], config.num_stages, config.num_warps)


def pin_triton_configs() -> str:
    """Keep one config (:data:`PINNED_TILE`, else the first) in both GEMM autotuners, so
    Triton tunes nothing; returns it as text."""
    from lorasc_kernels.backends.triton import fused_linear, fused_linear_tma

    kept = []
    for kernel in (fused_linear._fused_lowrank_kernel, fused_linear_tma._persistent_lowrank_kernel):
        pinned = [config for config in kernel.configs if _tile(config) == PINNED_TILE]
        kernel.configs = pinned[:1] or kernel.configs[:1]
        m, n, k, stages, warps = _tile(kernel.configs[0])
        kept.append(f"{m}x{n}x{k} s{stages} w{warps}")
    return " / ".join(dict.fromkeys(kept))


def build(name: str, tensors: Tensors, cuda: bool) -> torch.nn.Module:
    """Provider ``name`` over ``tensors`` (``providers.build``: no hooks). Dry,
    ``compile`` uses ``backend="aot_eager"`` (Dynamo and AOTAutograd, not inductor's C++
    build of 10 s+ per dtype on 2 cores)."""
    if name == "compile" and not cuda:
        torch._dynamo.reset()
        return torch.compile(providers.EagerLoRALinear(tensors), backend="aot_eager")
    if name.startswith("ours-"):  # its variant and graph replay are the caller's
        return providers.build("ours-triton", tensors)
    return providers.build(name, tensors)


def check(name: str, module: torch.nn.Module, tensors: Tensors) -> None:
    """Raise unless ``module``'s output (computed with grad) is within the tolerance."""
    output = module(tensors.x).detach().float()
    expected = providers.expected_output(name, tensors)
    error = float((output - expected).norm() / expected.norm())
    limit = providers.tolerance(tensors.x.dtype)
    if not error <= limit:
        raise ValueError(f"relative error {error:.2e} > {limit:.0e}")


def make_step(mode: str, module: torch.nn.Module, tensors: Tensors, capturable: bool = False):
    """``bench_layer.train_step_fn``; for a graph (``capturable``), the train step's AdamW
    keeps its step count on the GPU, as capture requires."""
    params = providers.trainable(module)
    if mode != "train step" or not capturable or not params:
        return train_step_fn(mode, module, tensors)
    optimizer = torch.optim.AdamW(params, lr=1e-4, capturable=True)
    x, grad_out = tensors.x, tensors.grad_out

    def train_step():
        clear_grads([x, *params])
        module(x).backward(grad_out)
        optimizer.step()

    return train_step


def graph_replay(make_fn, cuda: bool):
    """``make_fn()``'s step built and run 3 times on a side stream, then captured in a CUDA
    graph there; returns the graph's replay. Raises :class:`NoGraph` if capture fails (dry:
    after running the step once, uncaptured)."""
    if not cuda:
        make_fn()()
        raise NoGraph("CUDA graphs need a CUDA device (dry run: the step ran uncaptured)")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # forward and backward on the stream that captures
        fn = make_fn()
        for _ in range(3):
            fn()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=stream):
            fn()
    except Exception as error:
        raise NoGraph(f"{type(error).__name__}: {error}".splitlines()[0][:300]) from None
    torch.cuda.current_stream().wait_stream(stream)
    return graph.replay


def bench_ms(fn, cuda: bool) -> float:
    """Median ms of ``fn()``: ``do_bench`` on a GPU, one timed call on the CPU."""
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def host_ms(fn, cuda: bool) -> float:
    """Host ms per call over back-to-back calls (10; 1 dry), synced before and after only."""
    calls = 10 if cuda else 1
    _sync(cuda)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = (time.perf_counter() - start) * 1e3 / calls
    _sync(cuda)
    return elapsed


def _gpu_work(event) -> bool:
    """Whether a kineto event is device work (a kernel, copy or memset), not a span that
    the GPU timeline shows for an annotation such as ``Optimizer.step``."""
    if hasattr(event, "activity_type"):
        return event.activity_type() in ("kernel", "gpu_memcpy", "gpu_memset")
    annotation = getattr(event, "is_user_annotation", lambda: False)()
    return event.device_type() == torch.autograd.DeviceType.CUDA and not annotation


def gpu_profile(fn, cuda: bool) -> dict:
    """Per-call device figures of :data:`PROFILED_CALLS` back-to-back calls under
    ``torch.profiler`` (module docstring); dry, the CPU profile only and no figures."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(PROFILED_CALLS):
            fn()
        _sync(cuda)
    intervals, per_kernel, syncs = [], collections.Counter(), 0
    for event in prof.profiler.kineto_results.events():
        if _gpu_work(event):
            start = event.start_ns()
            intervals.append((start, start + event.duration_ns()))
            per_kernel[event.name()] += event.duration_ns()
        elif event.name() in SYNC_CALLS:
            syncs += 1
    if not cuda:
        return {}
    busy, end = 0, None
    for start, stop in sorted(intervals):
        if end is None or start >= end:
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    span = (
        max(stop for _, stop in intervals) - min(start for start, _ in intervals)
        if intervals
        else 0
    )
    per_call_ms = 1e-6 / PROFILED_CALLS
    return {
        "gpu_kernel_ms": significant(sum(per_kernel.values()) * per_call_ms),
        "gpu_busy_ms": significant(busy * per_call_ms),
        "gpu_span_ms": significant(span * per_call_ms),
        "gpu_busy_fraction": significant(busy / span, 3) if span else None,
        "kernels_per_call": significant(len(intervals) / PROFILED_CALLS, 3),
        "syncs_per_call": significant(max(0, syncs - 1) / PROFILED_CALLS, 3),  # less ours
        "kernel_ms": "; ".join(
            f"{name[:80].replace(';', ',')}={significant(ns * per_call_ms, 3)}"
            for name, ns in per_kernel.most_common(8)
        ),
    }


def measure(fn, cuda: bool) -> dict:
    """``bench_ms``, ``host_ms`` and the profile's columns of ``fn`` (already run once)."""
    return {
        "bench_ms": significant(bench_ms(fn, cuda)),
        "timer": "do_bench median" if cuda else "perf_counter, 1 call",
        "host_ms": significant(host_ms(fn, cuda)),
        **gpu_profile(fn, cuda),
    }


class Recorder:
    """Writes rows to the CSV as they come (flushed), with the run's constant columns."""

    def __init__(self, path: Path, constants: dict, budget_s: float):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.constants = path, constants
        self.start, self.budget_s = time.perf_counter(), budget_s
        self.failures: list[str] = []
        self._handle = path.open("w", newline="")
        self._writer = csv.DictWriter(self._handle, fieldnames=COLUMNS)
        self._writer.writeheader()

    def out_of_time(self) -> bool:
        return time.perf_counter() - self.start > self.budget_s

    def write(self, row: dict) -> None:
        row = dict.fromkeys(COLUMNS) | row | self.constants
        row["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        if str(row["error"]).startswith("failed"):
            self.failures.append(f"{row['problem']} {row['provider']} {row['mode']}")
        self._writer.writerow(row)
        self._handle.flush()
        shown = ("bench_ms", "host_ms", "gpu_busy_fraction", "syncs_per_call", "error")
        print(
            f"[{row['elapsed_s']:6.1f} s] {row['family']} {row['problem']} {row['provider']} "
            f"{row['mode'] or ''}: "
            + ", ".join(f"{key} {row[key]}" for key in shown if row[key] is not None),
            flush=True,
        )

    def close(self) -> None:
        self._handle.close()


def _error(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


def profile_linear(problem: Problem, recorder: Recorder, cuda: bool) -> None:
    """Every provider × mode of :data:`PROVIDERS` and :data:`MODES` on ``problem``."""
    tensors = Tensors.draw(problem)
    base = {
        "family": "linear",
        "problem": problem.label,
        "M": problem.M,
        "K": problem.K,
        "N": problem.N,
        "r": problem.r,
        "dtype": problem.dtype_name,
    }
    modules, unusable = {}, {}
    for name in PROVIDERS:
        if recorder.out_of_time():  # a build may compile for half a minute
            unusable[name] = "skipped: budget spent"
            continue
        try:
            with providers.variant_pinned(providers.variant_of(name)):
                modules[name] = build(name, tensors, cuda)
                check(name, modules[name], tensors)
        except providers.ProviderUnavailable as error:
            unusable[name] = f"skipped: {error}".splitlines()[0]
        except Exception as error:  # a failure, reported in its rows; the others run
            modules.pop(name, None)
            unusable[name] = f"failed: {_error(error)}"
    floor_ms = {}
    for mode, name in itertools.product(MODES, PROVIDERS):
        variant = providers.variant_of(name) or ("dispatch" if name.startswith("ours-") else None)
        row = base | {"provider": name, "mode": mode, "variant": variant}
        if name in unusable:
            recorder.write(row | {"error": unusable[name]})
            continue
        if recorder.out_of_time():
            recorder.write(row | {"error": "skipped: budget spent"})
            continue
        try:
            with providers.variant_pinned(providers.variant_of(name)):
                if name == GRAPH:

                    def make(mode=mode, module=modules[name]):
                        return make_step(mode, module, tensors, capturable=cuda)

                    fn = graph_replay(make, cuda)
                else:
                    fn = make_step(mode, modules[name], tensors)
                fn()  # first call: compiles, the dispatch's choice
                row |= measure(fn, cuda)
        except NoGraph as error:
            row["error"] = f"no graph: {error}"
        except Exception as error:
            row["error"] = f"failed: {_error(error)}"
        if name == "floor" and row.get("bench_ms"):
            floor_ms[mode] = row["bench_ms"]
        if row.get("bench_ms") and mode in floor_ms:
            row["vs_floor"] = significant(row["bench_ms"] / floor_ms[mode], 3)
        recorder.write(row)
    for line in providers.dispatch_choices():
        recorder.write({"family": "dispatch", "problem": problem.label, "note": line})


@torch.no_grad()
def profile_merge(size: int, weight_format: str, recorder: Recorder, device: str) -> None:
    """Copy, ``merge_lowrank_`` and the merge kernel alone on a ``size``² W in
    ``weight_format`` (``bf16`` or an fp8 format), r = :data:`MERGE_RANK`."""
    from lorasc_kernels.backends.triton import merge as triton_merge

    cuda = device.startswith("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    dense = 0.02 * torch.randn(size, size, generator=generator, device=device)
    lora_B = (1e-3 * torch.randn(size, MERGE_RANK, generator=generator, device=device)).bfloat16()
    lora_A = torch.randn(MERGE_RANK, size, generator=generator, device=device).bfloat16()
    if weight_format == "bf16":
        weight = codes = dense.bfloat16()
        moved = 2 * codes.numel() * codes.element_size()
    else:
        weight = quantize(dense, format_dtype(weight_format))
        codes = weight.codes
        moved = 2 * (codes.numel() * codes.element_size() + weight.scale.numel() * 4)
    destination = torch.empty_like(codes)
    signs = itertools.cycle((1.0, -1.0))  # W stays near where it started
    fns = {
        "copy": lambda: destination.copy_(codes),
        "merge_lowrank_": lambda: merge_lowrank_(
            weight, lora_B, lora_A, next(signs), seed=1, backend="triton"
        ),
        "merge kernel": lambda: triton_merge.merge_(
            weight, lora_B, lora_A, MergeSpec(next(signs), "stochastic", 1)
        ),
    }
    problem = f"merge {size}x{size} r{MERGE_RANK} {weight_format}"
    base = {"family": "merge", "problem": problem, "K": size, "N": size, "r": MERGE_RANK}
    copy_GBps = None
    for name, fn in fns.items():
        row = base | {"provider": name, "dtype": weight_format}
        if recorder.out_of_time():
            recorder.write(row | {"error": "skipped: budget spent"})
            continue
        try:
            fn()
            row |= measure(fn, cuda)
        except Exception as error:
            recorder.write(row | {"error": f"failed: {_error(error)}"})
            continue
        bytes_ = 2 * codes.numel() * codes.element_size() if name == "copy" else moved
        bandwidth = bytes_ / (row["bench_ms"] * 1e-3) / 1e9
        copy_GBps = bandwidth if name == "copy" else copy_GBps
        row["bandwidth_GBps"] = significant(bandwidth)
        row["bandwidth_vs_copy"] = significant(bandwidth / copy_GBps, 3) if copy_GBps else None
        recorder.write(row)


def problems(dry: bool) -> tuple[list[Problem], list[int]]:
    """The linear problems and the merge sizes (module docstring)."""
    if dry:
        tiny = [Problem(64, 32, 48, 4, dtype, "cpu") for dtype in (torch.bfloat16, torch.float16)]
        return tiny, [16, 32]
    linear = [
        Problem(8192, 4096, 4096, 16, torch.bfloat16, "cuda"),
        Problem(4096, 4096, 4096, 16, torch.float16, "cuda"),
    ]
    return linear, [4096, 8192]


def main(argv=None) -> int:
    """Command line (module docstring); returns the exit status: 1 if a row failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry", action="store_true", help="the CPU run (automatic without CUDA)")
    parser.add_argument("--out", type=Path, default=None, help="folder of the CSV")
    parser.add_argument(
        "--budget-s", type=float, default=210.0, help="start no row after this many seconds"
    )
    args = parser.parse_args(argv)
    dry = args.dry or not torch.cuda.is_available()
    if dry and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("a dry run needs TRITON_INTERPRET=1 before Triton is imported")
    if dry:
        torch.set_num_threads(1)  # tiny ops: a second thread only adds waits
        print("dry run: CPU, Triton interpreted, tiny shapes; no GPU figures", flush=True)
    device = "cpu" if dry else "cuda"
    import triton

    constants = {
        "device": device_name(device),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "driver": None if dry else _driver_version(),
        "triton_config": pin_triton_configs(),
    }
    folder = args.out or RESULTS_DIR / (
        f"{device_name(device)}-{time.strftime('%Y-%m-%d', time.gmtime())}"
    )
    recorder = Recorder(
        folder / time.strftime("profile-%H%M%SZ.csv", time.gmtime()), constants, args.budget_s
    )
    linear, merge_sizes = problems(dry)
    try:
        profile_linear(linear[0], recorder, not dry)
        for size, weight_format in itertools.product(merge_sizes, MERGE_FORMATS):
            profile_merge(size, weight_format, recorder, device)
        for problem in linear[1:]:
            profile_linear(problem, recorder, not dry)
    finally:
        recorder.close()
    print(f"wrote {recorder.path} in {time.perf_counter() - recorder.start:.0f} s", flush=True)
    if recorder.failures:
        print("FAILED rows: " + "; ".join(recorder.failures), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
