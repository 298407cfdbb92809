"""The eager autograd path against the custom op's, side by side, on the CPU.

``lorasc_kernels.ops`` reaches the backend two ways: :class:`~lorasc_kernels.ops.LinearFunction`
(eager mode) and the ``lorasc::linear_forward``/``linear_backward`` custom ops with their
registered autograd (what ``torch.compile`` traces). Both run the same composition; the op
path adds the dispatcher. This times one forward+backward of each on the same small problem
(where the overhead shows most), interleaved in alternating order, and reports the median
per-round difference and ratio with their spread::

    python -m benchmarks.bench_autograd_paths [--rounds 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lorasc_kernels import ops
from lorasc_kernels.backends.specs import LinearSpec


def _paths(m: int, k: int, n: int, r: int):
    """The two forward+backward closures on shared (M, K) x, (N, K) W, (r, K) A, (N, r) B."""
    x = torch.randn(m, k, requires_grad=True)
    weight, bias = torch.randn(n, k), torch.randn(n)
    lora_A = torch.randn(r, k, requires_grad=True)
    lora_B = torch.randn(n, r, requires_grad=True)
    spec = LinearSpec.of(2.0, 0.0, None, None, 0.0)

    def eager():
        ops.LinearFunction.apply(x, weight, bias, lora_A, lora_B, spec, "torch").sum().backward()

    def through_ops():
        y, _ = torch.ops.lorasc.linear_forward(
            x, weight, bias, lora_A, lora_B, *ops._linear_op_args(spec), "torch", None
        )
        y.sum().backward()

    return eager, through_ops


def _ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def measure(rounds: int, m: int = 64, k: int = 256, n: int = 256, r: int = 8) -> dict:
    """Per-round times (ms) of both paths, alternating which goes first."""
    eager, through_ops = _paths(m, k, n, r)
    for _ in range(20):  # warm-up
        eager()
        through_ops()
    eager_ms, op_ms = [], []
    for index in range(rounds):
        pair = (eager, through_ops) if index % 2 == 0 else (through_ops, eager)
        times = {fn: _ms(fn) for fn in pair}
        eager_ms.append(times[eager])
        op_ms.append(times[through_ops])
    diffs = [o - e for o, e in zip(op_ms, eager_ms, strict=True)]
    ratios = [o / e for o, e in zip(op_ms, eager_ms, strict=True)]
    quartiles = statistics.quantiles(diffs, n=4)
    return {
        "problem": f"M={m} K={k} N={n} r={r} float32, torch backend",
        "eager_ms": statistics.median(eager_ms),
        "op_ms": statistics.median(op_ms),
        "diff_ms": statistics.median(diffs),
        "diff_iqr_ms": (quartiles[0], quartiles[2]),
        "ratio": statistics.median(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    result = measure(args.rounds)
    low, high = result["diff_iqr_ms"]
    print(f"{result['problem']}, {torch.get_num_threads()} threads, {args.rounds} rounds:")
    print(
        f"eager {result['eager_ms']:.3f} ms, custom op {result['op_ms']:.3f} ms per "
        f"forward+backward; op - eager: median {result['diff_ms']:.3f} ms "
        f"(IQR {low:.3f} to {high:.3f}), ratio {result['ratio']:.3f}"
    )


if __name__ == "__main__":
    main()
