"""End-to-end layer step: forward+backward, and a training step with AdamW on the LoRA.

Layers are built the way users build them (``nn.Linear`` with bias, PEFT's
``get_peft_model``, ``LoRASCLinear.from_linear``). On CPU this is the comparison of the
foundation issue: M=2048, K=N=1024, r=16, fp32, 2 threads, forward+backward, side by side;
the goal is ours ≤ 1.12× the frozen floor and faster than PEFT.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import providers
from .bench_linear import HEADLINE, clear_grads, measure_all, on_gpu, select, step_fn
from .providers import Problem, Tensors

FAMILY = "layer"
MODES = ("forward+backward", "train step")
GOAL_RATIO = 1.12


def problems(quick: bool, device: str, full: bool = False) -> list[Problem]:
    """Tiny with ``quick``; the comparison problem on CPU; Llama-7B layers on GPU (one
    unless ``full``)."""
    if quick:
        dtype = torch.bfloat16 if on_gpu(device) else torch.float32
        return [Problem(37, 45, 29, 3, dtype, device, bias=True)]
    if not on_gpu(device):
        return [Problem(2048, 1024, 1024, 16, torch.float32, device, bias=True)]
    if not full:
        return [Problem(**HEADLINE, device=device, bias=True)]
    shapes = ((4096, 4096), (4096, 11008), (11008, 4096))
    return [
        Problem(m, k, n, 16, torch.bfloat16, device, bias=True)
        for m in (4096, 8192, 16384)
        for k, n in shapes
    ]


def provider_names(quick: bool, device: str) -> list[str]:
    """No fused-noise rows here (the linear family has them); ``torch.compile`` on CPU
    except in quick runs (its build takes 20 s+)."""
    if not on_gpu(device):
        if quick:
            print("skip compile in a quick CPU run: 20 s+ to build", flush=True)
        return providers.provider_names(("torch",), compile_=not quick, noise=False)
    return providers.provider_names(("triton", "cuda"), noise=False)


def train_step_fn(mode: str, module: torch.nn.Module, tensors: Tensors):
    """``step_fn`` plus ``"train step"``: forward, backward and an AdamW step on the LoRA
    factors (the floor has none: its step is its forward+backward)."""
    if mode != "train step":
        return step_fn(mode, module, tensors)
    params = providers.trainable(module)
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    x, grad_out = tensors.x, tensors.grad_out

    def train_step():
        clear_grads([x, *params])
        module(x).backward(grad_out)
        if optimizer is not None:
            optimizer.step()

    return train_step


def goal_report(rows: list[dict]) -> str:
    """The foundation issue's verdict on forward+backward rows: ours vs floor and PEFT."""
    lines = []
    fwd_bwd = [row for row in rows if row["mode"] == "forward+backward"]
    for label in dict.fromkeys((row["M"], row["K"], row["N"], row["r"]) for row in fwd_bwd):
        ratios = {
            row["provider"]: row["ratio_to_floor"]
            for row in fwd_bwd
            if (row["M"], row["K"], row["N"], row["r"]) == label
        }
        for ours in (name for name in ratios if name.startswith("ours-")):
            met = ratios[ours] <= GOAL_RATIO and ratios[ours] < ratios.get("peft", float("inf"))
            lines.append(
                f"M={label[0]} K={label[1]} N={label[2]} r={label[3]}: {ours} "
                f"{ratios[ours]}x the floor (goal <= {GOAL_RATIO}x), peft "
                f"{ratios.get('peft')}x, addmm {ratios.get('addmm')}x: "
                f"{'goal met' if met else 'goal MISSED'}"
            )
    return "\n".join(lines)


def run(
    quick: bool,
    device: str,
    out_dir: Path,
    full: bool = False,
    skip_backends=(),
    sink=None,
    selection: str = "all",
) -> list[dict]:
    """Run the family and return its rows (see ``bench_linear.measure_all``); ``selection``
    as in ``bench_linear.run``."""
    problem_list = select(problems(quick, device, full), selection)
    rows = measure_all(
        FAMILY,
        problem_list,
        provider_names(quick, device),
        MODES,
        quick,
        skip_backends,
        step_factory=train_step_fn,
        sink=sink,
    )
    if not quick and not on_gpu(device):  # the goal is the CPU comparison's
        print(goal_report(rows), flush=True)
    return rows
