"""The benchmarks run end to end on a CPU, their providers compute the same layer, and the
GPU check script runs its steps (GPU-only ones skipped) within its time box."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import providers
from benchmarks.providers import Problem, Tensors
from lorasc_kernels.backends.reference import noisy_weight
from tests.helpers import rel_error

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = [
    "date_utc",
    "device",
    "family",
    "provider",
    "mode",
    "M",
    "K",
    "N",
    "r",
    "dtype",
    "median_ms",
    "tflop_per_s",
    "ratio_to_floor",
    "peak_mem_MiB",
    "threads",
    "torch",
    "triton",
]
# CUDA hidden: the script and the CLI take their CPU paths even on a GPU machine.
CPU_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}


def run(command, timeout, **env):
    return subprocess.run(
        command, cwd=ROOT, env={**CPU_ENV, **env}, capture_output=True, text=True, timeout=timeout
    )


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory):
    """Output folder of one ``python -m benchmarks --quick`` run of the linear and layer
    families on the CPU."""
    out = tmp_path_factory.mktemp("bench")
    result = run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--device",
            "cpu",
            "--only",
            "linear,layer",
            "--out",
            str(out),
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_quick_run_writes_csv_with_units_and_plot(quick_out):
    csv_files = list(quick_out.glob("*.csv"))
    assert len(csv_files) == 1 and csv_files[0].name.endswith("-1threads.csv")
    rows = read_rows(csv_files[0])
    assert list(rows[0]) == COLUMNS
    assert {row["family"] for row in rows} == {"linear", "layer"}
    assert {"floor", "peft", "addmm", "ours-torch", "ours-torch+noise"} <= {
        row["provider"] for row in rows
    }
    for row in rows:
        ms, tflops = float(row["median_ms"]), float(row["tflop_per_s"])
        assert ms > 0
        problem = Problem(
            int(row["M"]), int(row["K"]), int(row["N"]), int(row["r"]), torch.float32, "cpu"
        )
        flops = problem.flops(row["mode"], lora=row["provider"] != "floor")
        assert tflops == pytest.approx(flops / (ms * 1e-3) / 1e12, rel=1e-3)
        if row["provider"] == "floor":
            assert float(row["ratio_to_floor"]) == 1.0
    png = quick_out / f"{csv_files[0].stem}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_prints_the_ratio_table(quick_out):
    result = run([sys.executable, "-m", "benchmarks", "--summary", str(quick_out)], timeout=120)
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[2].split()
    assert header[:5] == ["family", "MxKxN", "r", "dtype", "floor_ms"]
    assert {"peft", "addmm", "ours-torch"} <= set(header)


@pytest.mark.parametrize("name", ["peft", "addmm", "compile", "ours-torch", "ours-torch+noise"])
def test_providers_compute_the_same_layer(name):
    problem = Problem(37, 45, 29, 5, torch.float32, "cpu", bias=True)
    tensors = Tensors.draw(problem, seed=3)
    module = providers.build(name, tensors)
    y = module(tensors.x)
    y.backward(tensors.grad_out)
    assert rel_error(y, providers.expected_output(name, tensors)) < 1e-5

    # Gradients against float64 autograd of the eager LoRA on the same weight.
    weight = tensors.weight.double()
    if name.endswith("+noise"):
        weight = noisy_weight(tensors.weight, providers.NOISE_SEED, tensors.noise_scale).double()
    x = tensors.x.detach().double().requires_grad_()
    a = tensors.lora_A.double().requires_grad_()
    b = tensors.lora_B.double().requires_grad_()
    y64 = x @ weight.t() + tensors.bias.double() + tensors.scale * (x @ a.t()) @ b.t()
    y64.backward(tensors.grad_out.double())
    grad_a, grad_b = (p.grad for p in providers.trainable(module))
    for actual, expected in ((tensors.x.grad, x.grad), (grad_a, a.grad), (grad_b, b.grad)):
        assert rel_error(actual, expected) < 1e-5


def test_build_checked_skips_a_missing_backend_with_its_reason(capsys):
    tensors = Tensors.draw(Problem(8, 16, 12, 2, torch.float32, "cpu"))
    failures = []
    modules = providers.build_checked(["floor", "ours-cuda"], tensors, failures)
    assert list(modules) == ["floor"] and failures == []
    assert "skip ours-cuda: backend='cuda' is not available on cpu" in capsys.readouterr().out


def raising_provider(monkeypatch, name: str, when: str):
    """Make provider ``name`` raise at build time (``build``) or in its backward."""
    real = providers._BUILDERS[name]

    def broken(tensors):
        if when == "build":
            raise RuntimeError("kernel launch failed")
        module = real(tensors)
        module.register_full_backward_hook(
            lambda *args: (_ for _ in ()).throw(RuntimeError("backward kernel failed"))
        )
        return module

    monkeypatch.setitem(providers._BUILDERS, name, broken)


@pytest.mark.parametrize("when", ["build", "backward"])
def test_a_failing_provider_fails_its_family_by_name_after_the_others_ran(monkeypatch, when):
    from benchmarks import bench_linear

    raising_provider(monkeypatch, "addmm", when)
    written = []
    with pytest.raises(providers.ProviderFailures, match="FAILED provider addmm on"):
        bench_linear.run(quick=True, device="cpu", out_dir=None, sink=written.extend)
    providers_written = {row["provider"] for row in written}
    assert {"floor", "peft", "ours-torch"} <= providers_written
    assert ("addmm" in providers_written) == (when == "backward")  # its forward rows stand
    assert all(row["provider"] != "addmm" for row in written if row["mode"] != "forward")


def test_a_wrong_output_is_a_failure_not_a_skip(monkeypatch, capsys):
    monkeypatch.setattr(
        providers, "expected_output", lambda name, tensors: torch.ones(tensors.x.shape[0], 12)
    )
    tensors = Tensors.draw(Problem(8, 16, 12, 2, torch.float32, "cpu"))
    failures = []
    assert providers.build_checked(["floor"], tensors, failures) == {}
    assert failures and failures[0].startswith("FAILED provider floor on 8x16 fp32: relative")


def test_without_backends_drops_plain_and_noise_rows_of_those_backends():
    names = providers.provider_names(("torch", "triton", "cuda"))
    kept = providers.without_backends(names, ["cuda"])
    assert kept == [name for name in names if not name.startswith("ours-cuda")]
    assert "ours-triton+noise" in kept and "compile" in kept


def gpu_check(out: Path, steps: str, timeout: float, budget: int = 420, **env):
    return run(
        ["bash", "benchmarks/gpu_check.sh", str(out)],
        timeout=timeout,
        LORASC_GPU_CHECK_ALLOW_CPU="1",
        LORASC_GPU_CHECK_STEPS=steps,
        LORASC_GPU_CHECK_BUDGET_S=str(budget),
        PYTHON=sys.executable,
        **env,
    )


def summary_status(log: str) -> dict:
    """Step name → status words, from the summary block of the script's log."""
    block = log.split("=== summary")[1].split("\n\n")[0].splitlines()[1:]
    return {line.split()[0]: " ".join(line.split()[1:]) for line in block}


def test_gpu_check_cpu_mode_runs_steps_and_skips_gpu_ones(tmp_path):
    result = gpu_check(
        tmp_path, "env,ceilings,build_cuda,gpu_tests,kernels,bench_layer,report", timeout=400
    )
    assert result.returncode == 0, result.stdout[-3000:]
    status = summary_status(result.stdout)
    for step in ("build_cuda", "gpu_tests", "kernels"):
        assert status[step] == "skipped (needs a GPU)"
    assert status["bench_linear"] == "skipped (not selected)"
    for step in ("env", "ceilings", "bench_layer", "report"):
        assert status[step].startswith("ok"), status
    assert "copy_GB_per_s" in result.stdout
    assert "skip ours-cuda: the build step made no extension" in result.stdout
    environment = (tmp_path / "environment.txt").read_text()
    assert "torch " in environment and "peft " in environment and "CUDA toolkit:" in environment
    assert (tmp_path / "gpu_check.log").read_text() == result.stdout
    rows = read_rows(next(tmp_path.glob("*.csv")))
    assert {row["family"] for row in rows} == {"layer"}
    assert list(tmp_path.glob("*.png"))
    assert "time / floor time" in "\n".join(result.stdout.splitlines()[-5:])  # table last


def test_gpu_check_time_box_stops_steps_and_still_reports(tmp_path):
    """A step that cannot end (its floor provider waits forever, whatever the machine's
    speed) is stopped by the box; the report still runs, and the run fails."""
    result = gpu_check(
        tmp_path / "out",
        "env,headline,report",
        timeout=300,  # a guard: the box must have stopped the step long before
        budget=45,
        PYTHONPATH=_provider_hook(tmp_path, "floor", "time.sleep(3600)"),
    )
    assert result.returncode == 1, result.stdout[-3000:]
    status = summary_status(result.stdout)
    assert status["headline"].startswith("TIMEOUT"), status
    assert status["report"].startswith("ok"), status


def test_gpu_check_refuses_to_run_on_cpu_unless_allowed(tmp_path):
    result = run(
        ["bash", "benchmarks/gpu_check.sh", str(tmp_path)],
        timeout=120,
        LORASC_GPU_CHECK_ALLOW_CPU="0",
        PYTHON=sys.executable,
    )
    assert result.returncode == 2
    assert "LORASC_GPU_CHECK_ALLOW_CPU=1" in result.stderr + result.stdout


# Replaces a provider's builder in every Python process of the script that imports it.
PROVIDER_HOOK = """
import importlib.abc, sys, time

class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "benchmarks.bench_linear":
            sys.meta_path.remove(self)
            import benchmarks.providers as providers

            def replaced(tensors):
                {body}

            providers._BUILDERS[{provider!r}] = replaced
        return None

sys.meta_path.insert(0, _Hook())
"""


def _provider_hook(tmp_path: Path, provider: str, body: str) -> str:
    """A PYTHONPATH whose ``sitecustomize`` makes ``provider``'s builder run ``body``."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PROVIDER_HOOK.format(provider=provider, body=body))
    return f"{ROOT}{os.pathsep}{hook}"


def test_gpu_check_names_a_failing_provider_in_its_step_and_the_summary(tmp_path):
    hook = _provider_hook(tmp_path, "addmm", 'raise RuntimeError("the kernel did not launch")')
    result = gpu_check(tmp_path / "out", "headline,report", timeout=400, PYTHONPATH=hook)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "FAILED provider addmm on" in result.stdout
    status = summary_status(result.stdout)
    assert status["headline"].startswith("FAILED (exit 1), failed providers: addmm"), status
    assert status["report"].startswith("ok")
    rows = read_rows(next((tmp_path / "out").glob("*.csv")))
    assert {"floor", "peft", "ours-torch", "ours-triton"} <= {row["provider"] for row in rows}


def test_summary_shortens_a_long_table_and_names_its_file(tmp_path, capsys):
    from benchmarks.__main__ import SUMMARY_ROWS, summarize

    path = tmp_path / "long.csv"
    rows = SUMMARY_ROWS + 7
    path.write_text("step,loss\n" + "".join(f"{i},{i / 10}\n" for i in range(rows)))
    path.with_suffix(".md").write_text("# report\n")
    summarize([path])
    out = capsys.readouterr().out
    assert f"{SUMMARY_ROWS - 1} " in out and f"\n{SUMMARY_ROWS} " not in out
    assert f"... 7 more rows in {path}; its report: {path.with_suffix('.md')}" in out
