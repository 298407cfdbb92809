"""Speed of the LoRASC linear and merge on fp8 e4m3 weights against bf16 ones.

Linear (M=8192, K=N=4096, r=16 on a GPU; M=64, K=N=256 on the CPU), ``forward`` and
``forward+backward`` (LoRA and input gradients), providers:

* ``frozen-bf16``: ``torch.nn.functional.linear`` with a frozen bf16 weight, the floor;
* ``ours-bf16``: ``LoRASCLinear`` on the bf16 weight;
* ``ours-fp8``: ``LoRASCLinear(weight_format="fp8_e4m3")`` on the same weight (the fused GEMM
  reads fp8 codes and scales; ``docs/fp8.md``), the storage mode;
* ``ours-fp8-compute``: the same layer with ``compute="fp8"`` (x and dY quantized per row to
  e4m3, the GEMMs on fp8 operands);
* ``scaled-mm-rowwise`` (forward only: it has no backward): ``Fp8Linear``, x quantized per
  row and ``torch._scaled_mm`` with row-wise scales (cuBLAS's fp8 GEMM), no LoRA.

Merge (``size × size``, r=16: 4096² on a GPU, 512² on the CPU), stochastic rounding:
``copy-bf16`` (a device copy of the bf16 weight), ``ours-bf16``, ``ours-fp8``.
``bandwidth_GBps`` counts one read and one write of the weight's bytes (fp8: one byte per
element plus the scales). Backend: ``auto`` (Triton on a GPU, the torch reference on the CPU).
Rows go to ``fp8_<device>.csv``.

Usage: ``python -m benchmarks.bench_fp8 [--quick] [--device cuda]``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.common import append_csv, device_name, family_main, significant, time_all_ms
from lorasc_kernels import LoRASCLinear, merge_lowrank_
from lorasc_kernels.formats.quantize import format_dtype, quantize
from lorasc_kernels.fp8_linear import Fp8Linear

RANK = 16
# Providers without a backward: timed in the forward only.
FORWARD_ONLY = ("scaled-mm-rowwise",)


def _layers(K: int, N: int, device: str) -> dict:
    """Provider name → a module over the same bf16 weight (LoRA B nonzero)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(K, N, bias=False, device=device, dtype=torch.bfloat16)
    linear.requires_grad_(False)
    layers = {"frozen-bf16": linear}
    for name, weight_format, compute in (
        ("ours-bf16", None, None),
        ("ours-fp8", "fp8_e4m3", None),
        ("ours-fp8-compute", "fp8_e4m3", "fp8"),
    ):
        layer = LoRASCLinear.from_linear(
            linear, r=RANK, weight_format=weight_format, compute=compute
        )
        torch.nn.init.normal_(layer.lora_B, std=0.01)
        layers[name] = layer
    layers["scaled-mm-rowwise"] = Fp8Linear.from_linear(linear, "fp8_e4m3")
    return layers


def measure_linear(M: int, K: int, N: int, device: str, quick: bool) -> list[dict]:
    """Forward and forward+backward time of each provider."""
    layers = _layers(K, N, device)
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=torch.bfloat16)

    def forward(layer):
        with torch.no_grad():
            return layer(x)

    def forward_backward(layer):
        layer(x).backward(dy)

    rows = []
    for mode, step in (("forward", forward), ("forward+backward", forward_backward)):
        times = time_all_ms(
            {
                name: (lambda s=step, layer=layer: s(layer))
                for name, layer in layers.items()
                if mode == "forward" or name not in FORWARD_ONLY
            },
            device,
            quick,
        )
        for name, ms in times.items():
            rows.append(
                {
                    "device": device_name(device),
                    "op": "linear",
                    "mode": mode,
                    "shape": f"M={M} K={K} N={N} r={RANK}",
                    "provider": name,
                    "time_ms": significant(ms),
                    "vs_frozen_bf16": significant(ms / times["frozen-bf16"], 3),
                    "bandwidth_GBps": None,
                }
            )
    return rows


@torch.no_grad()
def measure_merge(size: int, device: str, quick: bool) -> list[dict]:
    """Time and bandwidth of a merge into a bf16 and an fp8 weight, and of a bf16 copy."""
    torch.manual_seed(0)
    weight = 0.02 * torch.randn(size, size, device=device)
    bf16 = weight.to(torch.bfloat16)
    fp8 = quantize(weight, format_dtype("fp8_e4m3"))
    lora_B = 1e-3 * torch.randn(size, RANK, device=device)
    lora_A = torch.randn(RANK, size, device=device)
    destination = torch.empty_like(bf16)
    functions = {
        "copy-bf16": lambda: destination.copy_(bf16),
        "ours-bf16": lambda: merge_lowrank_(bf16, lora_B, lora_A, 1.0, seed=1),
        "ours-fp8": lambda: merge_lowrank_(fp8, lora_B, lora_A, 1.0, seed=1),
    }
    moved = {
        "copy-bf16": 2 * bf16.numel() * 2,
        "ours-bf16": 2 * bf16.numel() * 2,
        "ours-fp8": 2 * (fp8.codes.numel() + fp8.scale.numel() * 4),
    }
    times = time_all_ms(functions, device, quick)
    return [
        {
            "device": device_name(device),
            "op": "merge",
            "mode": "stochastic",
            "shape": f"{size}x{size} r={RANK}",
            "provider": name,
            "time_ms": significant(ms),
            "vs_frozen_bf16": None,
            "bandwidth_GBps": significant(moved[name] / (ms * 1e-3) / 1e9),
        }
        for name, ms in times.items()
    ]


def run(quick: bool, device: str, out_dir: Path) -> list[dict]:
    """The linear and the merge at the sizes of the module docstring (``quick``: a quarter
    of M and of the merge's side)."""
    gpu = device.startswith("cuda")
    M, K, N, size = (8192, 4096, 4096, 4096) if gpu else (64, 256, 256, 512)
    if quick:
        M, size = M // 4, size // 4
    rows = measure_linear(M, K, N, device, quick) + measure_merge(size, device, quick)
    append_csv(rows, Path(out_dir) / f"fp8_{device_name(device)}.csv")
    return rows


if __name__ == "__main__":
    family_main(run, __doc__.split("\n")[0], "a quarter of M and of the merge's side")
