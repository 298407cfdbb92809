"""The foundation issue's CPU comparison as a pytest-benchmark table; runs only when asked:

    python -m pytest benchmarks/test_bench_cpu.py --benchmark-columns=median,iqr,rounds

(``pytest tests`` never collects it). M=2048, K=N=1024, r=16, fp32, bias, 2 threads,
forward+backward: the frozen floor (forward + dX), PEFT's LoRA Linear, the ``addmm_``
autograd Function and ours (torch backend), in one group so the table compares them.
``python -m benchmarks --only layer --device cpu`` times the same in turns, which is fairer
on a CPU shared with other work.
"""

import pytest
import torch

from benchmarks import providers
from benchmarks.bench_linear import step_fn
from benchmarks.providers import Problem, Tensors

PROBLEM = Problem(2048, 1024, 1024, 16, torch.float32, "cpu", bias=True)


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("name", ["floor", "peft", "addmm", "ours-torch"])
def test_forward_backward(benchmark, name):
    tensors = Tensors.draw(PROBLEM)
    failures = []
    modules = providers.build_checked([name], tensors, failures)  # leaves out a wrong output
    assert list(modules) == [name], failures
    benchmark.group = f"forward+backward {PROBLEM.label}, 2 threads"
    benchmark.pedantic(
        step_fn("forward+backward", modules[name], tensors), rounds=10, warmup_rounds=2
    )
    assert tensors.x.grad is not None and tensors.x.grad.abs().sum() > 0
