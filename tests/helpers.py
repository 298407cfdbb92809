"""Shared test helpers: tolerances of docs/design.md §7, float64 oracles, input factories."""

import pytest
import torch

from lorasc_kernels.backends import backend_module
from lorasc_kernels.formats.registry import scaled_weight_dtype

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Relative Frobenius error against float64.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# Kernels whose fp32 dot products may run in tf32 / fp32-dot-in-Triton.
KERNEL_TOLERANCE = {**TOLERANCE, torch.float32: 5e-4}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖_F / ‖expected‖_F, in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def lowrank_inputs(M, K, N, r, dtype, device="cpu", lora_dtype=None, bias=True):
    """Fresh random x (M, K), W (N, K), b (N,), A (r, K), B (N, r); B nonzero."""
    lora_dtype = lora_dtype or dtype
    x = torch.randn(M, K, device=device).to(dtype)
    weight = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    lora_A = (torch.randn(r, K, device=device) / K**0.5).to(lora_dtype)
    lora_B = (torch.randn(N, r, device=device) / r**0.5).to(lora_dtype)
    return x, weight, b, lora_A, lora_B


def reference_float64(x, weight, bias, lora_A, lora_B, scale, keep=None, p=0.0, noise=None):
    """y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ in float64; ``keep`` is the dropout keep-mask,
    ``noise`` a float64 tensor added to W."""
    x64, w64 = x.double(), weight.double()
    if noise is not None:
        w64 = w64 + noise
    xd = x64 if keep is None else torch.where(keep, x64 / (1 - p), torch.zeros_like(x64))
    y = x64 @ w64.t() + scale * (xd @ lora_A.double().t()) @ lora_B.double().t()
    return y if bias is None else y + bias.double()


def scaled_backend(backend: str, dtype: torch.dtype) -> str:
    """``backend`` if it declares the scaled format ``dtype``, else skip the test."""
    if dtype not in backend_module(backend).SCALED_WEIGHT_DTYPES:
        pytest.skip(f"backend {backend!r} declares no {dtype} weights")
    return backend


def scaled_step(dtype: torch.dtype, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """An upper bound of the format's step (its spacing) at float64 ``values`` (rows, cols) of
    rows scaled by ``scale`` (rows,): ``|v| · 2**-mantissa_bits``, at least the subnormal step
    ``scale · 2**(min_exponent - mantissa_bits)``."""
    entry = scaled_weight_dtype(dtype)
    subnormal = scale.double()[:, None] * 2.0 ** (entry.min_exponent - entry.mantissa_bits)
    return torch.maximum(values.abs() * 2.0**-entry.mantissa_bits, subnormal)


def trainer_args_and_state(output_dir, global_step: int = 0):
    """Trainer-like ``(args, state)`` of one process, as a Trainer hands its callbacks."""
    from types import SimpleNamespace

    args = SimpleNamespace(
        output_dir=str(output_dir),
        world_size=1,
        process_index=0,
        resume_from_checkpoint=None,
        report_to=[],
    )
    return args, SimpleNamespace(global_step=global_step, is_world_process_zero=True)


def benchmark_csv(module: str, args: list[str], out, pattern: str, env: dict, timeout=300):
    """Run ``python -m <module> <args> --out <out>`` from the repository root with ``env``,
    assert it succeeded, and return ``(columns, rows, stdout)`` of the one CSV file in
    ``out`` matching ``pattern``."""
    import csv
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run(
        [sys.executable, "-m", module, *args, "--out", str(out)],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    files = list(Path(out).glob(pattern))
    assert len(files) == 1, files
    with files[0].open(newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader), result.stdout
