"""Fused low-rank linear family: forward, backward, forward+backward and peak memory.

Every provider of :mod:`benchmarks.providers` runs the same problems; times are medians
(``do_bench`` on GPU, turns of wall-clock timing on CPU) and each row carries its ratio to
the frozen-linear floor of the same problem and mode.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from . import providers
from .common import peak_memory_mib, result_row, time_all_ms
from .providers import Problem, Tensors

FAMILY = "linear"
MODES = ("forward", "backward", "forward+backward")

# Weight shapes (K in, N out) of real models: Llama-2-7B attention and MLP, Llama-3-70B MLP.
MODEL_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672))
GPU_TOKENS = (4096, 8192, 16384)
GPU_RANKS = (8, 16, 64)
GPU_DTYPES = (torch.bfloat16, torch.float16)
# The GPU check's first benchmark: a Llama-7B attention projection over 8192 tokens.
HEADLINE = dict(M=8192, K=4096, N=4096, r=16, dtype=torch.bfloat16)
SELECTIONS = ("all", "headline", "rest")


def on_gpu(device: str) -> bool:
    """Whether ``device`` (``cpu``, ``cuda``, ``cuda:1``...) is a GPU."""
    return device.startswith("cuda")


def select(problem_list: list[Problem], selection: str) -> list[Problem]:
    """``problem_list`` (``all``), its first problem, the headline (``headline``), or the
    others (``rest``)."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    return {"all": problem_list, "headline": problem_list[:1], "rest": problem_list[1:]}[selection]


def problems(quick: bool, device: str, full: bool = False) -> list[Problem]:
    """The problems to run: tiny with ``quick``, the whole matrix with ``full``, else the
    reduced matrix that fits the GPU check (or 2 CPU cores); the first is the headline."""
    if quick:
        dtype = torch.bfloat16 if on_gpu(device) else torch.float32
        return [Problem(37, 45, 29, 3, dtype, device)]
    if not on_gpu(device):
        # Llama-like shapes a quarter wide, in fp32 (this CPU has no native bf16 matmul).
        shapes = (
            (1024, 1024, 16),
            (1024, 2752, 16),
            (2752, 1024, 16),
            (1024, 1024, 8),
            (1024, 1024, 64),
        )
        return [Problem(2048, k, n, r, torch.float32, device) for k, n, r in shapes]
    headline = Problem(**HEADLINE, device=device)
    if full:
        matrix = [
            Problem(m, k, n, r, dtype, device)
            for (k, n), m, r, dtype in itertools.product(
                MODEL_SHAPES, GPU_TOKENS, GPU_RANKS, GPU_DTYPES
            )
        ]
        return [headline] + [problem for problem in matrix if problem != headline]
    bf16 = torch.bfloat16
    return (
        [headline]
        + [Problem(8192, k, n, 16, bf16, device) for k, n in MODEL_SHAPES[1:]]
        + [
            Problem(8192, 4096, 4096, 64, bf16, device),
            Problem(4096, 4096, 4096, 16, torch.float16, device),
        ]
    )


def provider_names(quick: bool, device: str, full: bool = False) -> list[str]:
    """Providers for ``device``. On CPU: Triton only interpreted with ``quick`` (a check
    of correctness, not speed). No ``torch.compile``: its build takes 20 s+ per shape on
    the CPU and 30 s+ per shape on a GPU, more than the GPU check can give (``--full``
    and the CPU layer family have it)."""
    if not on_gpu(device):
        print("skip compile in the linear family on CPU: 20 s+ to build per shape", flush=True)
        return providers.provider_names(
            ("torch", "triton") if quick else ("torch",), compile_=False
        )
    return providers.provider_names(("triton", "cuda"), compile_=full, triton_variants=True)


def clear_grads(tensors: list[torch.Tensor]) -> None:
    """Drop the ``.grad`` of each tensor (cheaper and clearer than zeroing)."""
    for tensor in tensors:
        tensor.grad = None


def step_fn(mode: str, module: torch.nn.Module, tensors: Tensors):
    """A callable running ``mode`` of ``module`` once on ``tensors``; gradients are reset
    before each backward so no accumulation is timed."""
    x, grad_out = tensors.x, tensors.grad_out
    grads = [x, *providers.trainable(module)]
    if mode == "forward":
        return lambda: module(x)
    if mode == "backward":
        y = module(x)

        def backward():
            clear_grads(grads)
            y.backward(grad_out, retain_graph=True)

        return backward
    if mode == "forward+backward":

        def forward_backward():
            clear_grads(grads)
            module(x).backward(grad_out)

        return forward_backward
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def measure(
    family: str,
    problem: Problem,
    names: list[str],
    modes,
    quick: bool,
    failures: list[str],
    step_factory=step_fn,
    sink=None,
) -> list[dict]:
    """Rows of ``names`` on ``problem`` for each mode (plus peak memory on GPU), also
    handed to ``sink``; ``step_factory(mode, module, tensors)`` makes the timed callables.
    Providers that fail are left out and recorded in ``failures``."""
    tensors = Tensors.draw(problem)
    modules = providers.build_checked(names, tensors, failures)
    rows = []
    for mode in modes:
        if "floor" not in modules:
            print(f"skip {problem.label}: the floor did not run", flush=True)
            return rows
        fns = {
            name: providers.pinned(step_factory(mode, module, tensors), providers.variant_of(name))
            for name, module in modules.items()
        }
        fns = providers.check_runs(fns, f"{problem.label} {mode}", failures)
        modules = {name: modules[name] for name in fns}
        if "floor" not in fns:
            continue
        times = time_all_ms(fns, problem.device, quick)
        for name, ms in times.items():
            peak = None
            if mode == "forward+backward":
                peak = peak_memory_mib(fns[name], problem.device)
            rows.append(
                result_row(
                    family,
                    problem,
                    name,
                    mode,
                    ms,
                    problem.flops(mode, lora=name != "floor"),
                    times["floor"],
                    peak,
                )
            )
    print(
        f"{family} {problem.label}: "
        + ", ".join(
            f"{row['provider']} {row['ratio_to_floor']}x"
            for row in rows
            if row["mode"] == modes[-1]
        ),
        flush=True,
    )
    for line in providers.dispatch_choices():
        print(line, flush=True)
    if sink is not None:
        sink(rows)
    return rows


def measure_all(
    family: str,
    problem_list: list[Problem],
    names: list[str],
    modes,
    quick: bool,
    skip_backends=(),
    step_factory=step_fn,
    sink=None,
) -> list[dict]:
    """:func:`measure` over ``problem_list``; each problem's rows go to ``sink`` as they come
    (``python -m benchmarks`` appends them to the CSV: a timeout keeps what ran). Raises
    :class:`~benchmarks.providers.ProviderFailures` at the end if any provider failed."""
    for backend in skip_backends:
        print(f"skip ours-{backend}: --skip-backends {backend}", flush=True)
    names = providers.without_backends(names, skip_backends)
    failures: list[str] = []
    rows = [
        row
        for problem in problem_list
        for row in measure(family, problem, names, modes, quick, failures, step_factory, sink)
    ]
    providers.raise_failures(failures)
    return rows


def run(
    quick: bool,
    device: str,
    out_dir: Path,
    full: bool = False,
    skip_backends=(),
    sink=None,
    selection: str = "all",
) -> list[dict]:
    """Run the family and return its rows (see :func:`measure_all`); ``selection``: all
    problems, the headline one, or the rest."""
    problem_list = select(problems(quick, device, full), selection)
    return measure_all(
        FAMILY,
        problem_list,
        provider_names(quick, device, full),
        MODES,
        quick,
        skip_backends,
        sink=sink,
    )
