"""Speed and memory of the in-place cascade merge against a device copy and PEFT's merge.

Problems: a bf16 ``W`` (size × size) with bf16 ``A``, ``B`` of rank r; 4096² and 8192²,
r = 16 and 64 on a GPU; 1024², r = 16 and 64 on the CPU. Providers, timed in one run:

* ``copy``: ``dst.copy_(W)``, the device's copy bandwidth over the same bytes;
* ``ours-<backend>``: :func:`lorasc_kernels.merge_lowrank_`, stochastic rounding;
  ``ours-<backend>+noise`` also swaps the cascade noise (the real cascade boundary);
* ``peft``: PEFT's LoRA ``Linear.merge`` body, ``weight.data += get_delta_weight()``
  (``B @ A * scaling`` as a full-size temporary, then an add).

Columns: ``bandwidth_GBps`` counts one read and one write of ``W`` (what a perfect in-place
merge moves), ``bandwidth_vs_copy`` divides it by the copy's, ``speedup_vs_peft`` is PEFT's
time over the provider's. ``peak_extra_MiB`` is the memory the call allocates beyond what
existed before: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU, the high-water
mark of torch's allocations recorded by ``torch.profiler`` (``profile_memory=True``), which
sees every tensor torch allocates (the CPU allocator keeps no statistics). Our CPU path is
the torch reference, which works on blocks of 2**16 elements, so its temporaries stay near
3.5 MiB whatever ``W``'s size while PEFT's grow with ``W``; the Triton and CUDA kernels
allocate none (after the Triton kernel's one-time autotuning).

Usage: ``python -m benchmarks.bench_merge [--quick] [--device cuda]``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks import providers
from benchmarks.common import (
    append_csv,
    device_name,
    family_main,
    peak_memory_mib,
    significant,
    time_all_ms,
)
from lorasc_kernels import merge_lowrank_
from lorasc_kernels.backends import resolve_backend

SLOW_RATE = 0.5
NOISE_SEEDS = (101, 102)  # the noise removed and the noise added by the "+noise" rows


def problems(quick: bool, device: str) -> list[tuple[int, int]]:
    """``(size, r)`` pairs: the GPU or CPU set; ``quick`` keeps a small one (256² on CPU)."""
    if device.startswith("cuda"):
        return [(4096, 16)] if quick else [(4096, 16), (4096, 64), (8192, 16), (8192, 64)]
    return [(256, 16)] if quick else [(1024, 16), (1024, 64)]


def our_backends(device: str, skip_backends=()) -> list[str]:
    """Our backends timed: the kernels that can run on a GPU (less ``skip_backends``), the
    reference on the CPU; each one left out is printed with the reason."""
    if not device.startswith("cuda"):
        return ["torch"]
    usable = []
    for name in ("triton", "cuda"):
        if name in skip_backends:
            print(f"skip ours-{name}: --skip-backends {name}", flush=True)
            continue
        try:
            resolve_backend(name, torch.device(device))
        except RuntimeError as error:
            print(f"skip ours-{name}: {error}".splitlines()[0], flush=True)
            continue
        usable.append(name)
    return usable


def cpu_peak_mib(fn) -> float:
    """High-water mark of torch's CPU allocations during ``fn()``, in MiB (torch.profiler)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    allocations = []
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.tag == _EventType.Allocation:
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
    current = peak = 0
    for _, size in sorted(allocations, key=lambda item: item[0]):
        current += size
        peak = max(peak, current)
    return peak / 2**20


def merge_functions(tensors: providers.Tensors, backends: list[str]) -> dict:
    """Provider name → a no-argument call that merges into (or copies) ``tensors.weight``."""
    weight, lora_B, lora_A = tensors.weight, tensors.lora_B, tensors.lora_A
    coeff = SLOW_RATE * tensors.scale
    noise = {
        "noise_remove": (NOISE_SEEDS[0], tensors.noise_scale),
        "noise_add": (NOISE_SEEDS[1], tensors.noise_scale),
    }
    destination = torch.empty_like(weight)
    peft_layer = providers.build("peft", tensors)  # shares weight's storage

    def peft_merge():
        peft_layer.base_layer.weight.data += peft_layer.get_delta_weight("default")

    functions = {"copy": lambda: destination.copy_(weight)}
    for backend in backends:
        functions[f"ours-{backend}"] = lambda b=backend: merge_lowrank_(
            weight, lora_B, lora_A, coeff, rounding="stochastic", seed=1, backend=b
        )
        functions[f"ours-{backend}+noise"] = lambda b=backend: merge_lowrank_(
            weight, lora_B, lora_A, coeff, rounding="stochastic", seed=1, backend=b, **noise
        )
    functions["peft"] = peft_merge
    return functions


@torch.no_grad()
def measure(
    size: int, r: int, device: str, backends: list[str], quick: bool, failures: list[str]
) -> list[dict]:
    """One row per provider for a bf16 ``size × size`` weight and rank ``r``; providers
    that raise are left out and recorded in ``failures``."""
    problem = providers.Problem(1, size, size, r, torch.bfloat16, device)
    tensors = providers.Tensors.draw(problem)
    functions = providers.check_runs(
        merge_functions(tensors, backends), f"merge {size}x{size} r{r}", failures
    )
    if "copy" not in functions or "peft" not in functions:
        print(f"skip merge {size}x{size} r{r}: the copy or PEFT's merge did not run", flush=True)
        return []
    times = time_all_ms(functions, device, quick)  # also warms up (and tunes) every kernel
    moved_bytes = 2 * tensors.weight.numel() * tensors.weight.element_size()
    copy_GBps = moved_bytes / (times["copy"] * 1e-3) / 1e9
    rows = []
    for name, fn in functions.items():
        peak = peak_memory_mib(fn, device) if device.startswith("cuda") else cpu_peak_mib(fn)
        bandwidth = moved_bytes / (times[name] * 1e-3) / 1e9
        rows.append(
            {
                "device": device_name(device),
                "size": size,
                "r": r,
                "dtype": "bf16",
                "provider": name,
                "time_ms": significant(times[name]),
                "bandwidth_GBps": significant(bandwidth),
                "bandwidth_vs_copy": significant(bandwidth / copy_GBps, 3),
                "speedup_vs_peft": significant(times["peft"] / times[name], 3),
                "peak_extra_MiB": significant(peak),
                "weight_MiB": significant(moved_bytes / 2 / 2**20),
                "threads": torch.get_num_threads(),
            }
        )
    return rows


def run(quick: bool, device: str, out_dir: Path, skip_backends=()) -> list[dict]:
    """All problems of :func:`problems`; each problem's rows appended to
    ``out_dir/merge_<device>.csv`` as it ends. Raises
    :class:`~benchmarks.providers.ProviderFailures` at the end if a provider failed."""
    backends = our_backends(device, skip_backends)
    path = Path(out_dir) / f"merge_{device_name(device)}.csv"
    rows, failures = [], []
    for size, r in problems(quick, device):
        problem_rows = measure(size, r, device, backends, quick, failures)
        append_csv(problem_rows, path)
        rows += problem_rows
    providers.raise_failures(failures)
    return rows


if __name__ == "__main__":
    family_main(run, __doc__.split("\n")[0], "one small problem")
