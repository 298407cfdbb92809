"""``backends/triton/launch.py``: an autotuned kernel launched through its autotuner once
per autotuning key, then with the config the autotuner chose, and the same launches (the
same config, arguments, grid) as through the autotuner every time. Run on the GPU path of
``triton.autotune`` (several configs, the JIT function replaced by a recorder)."""

import copy
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402

from benchmarks.bench_host import LaunchCounter  # noqa: E402
from lorasc_kernels.backends.triton import fused_linear, launch  # noqa: E402

CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4)
    for m, n in ((128, 128), (64, 128), (64, 64))
]


class RecordingFn:
    """Stands in for the JIT function under the autotuner: records each run's arguments."""

    def __init__(self, fn):
        self.arg_names, self.runs = fn.arg_names, []

    def run(self, *args, **kwargs):
        self.runs.append((args, kwargs))


@pytest.fixture
def tuned(monkeypatch):
    """A copy of the tiled GEMM's autotuner with three configs over a recording function;
    each new key "tunes" to the config ``choice[0]`` names."""
    kernel = copy.copy(fused_linear._fused_lowrank_kernel)
    kernel.configs, kernel.cache = CONFIGS, {}
    kernel.fn = RecordingFn(kernel.fn)
    choice = [0]
    kernel.prune_configs = lambda kwargs: [CONFIGS[choice[0]]]  # one config: no timing
    monkeypatch.setattr(launch, "_SIGNATURES", {})
    monkeypatch.setattr(launch, "_CHOSEN", {})
    return kernel, choice


def _args(m, n, k, r, dtype, noise=False, transposed=False):
    p, q = torch.empty(m, k, dtype=dtype), torch.empty(n, k, dtype=dtype)
    u, v, out = torch.empty(m, r, dtype=dtype), torch.empty(n, r, dtype=dtype), p.new_empty(m, n)
    bucket = 1 << (m - 1).bit_length()
    args = (out, p, q, out, u, v, m, n, k, r, bucket, *out.stride(), *p.stride(), *q.stride())
    args += (*u.stride(), *v.stride(), 0.5, 0, 0.0, 0, 0, 1.0)
    kwargs = dict(HAS_BIAS=False, FUSED_NOISE=noise, W_TRANSPOSED=transposed, LORA_DROPOUT=False)
    return args, kwargs | dict(R_BLOCK=16, DOT_PRECISION="tf32", INTERPRETING=False)


def test_later_launches_of_a_key_skip_the_autotuner_with_its_config(tuned, monkeypatch):
    kernel, choice = tuned
    autotuner_runs = []
    run = type(kernel).run
    monkeypatch.setattr(
        type(kernel), "run", lambda self, *a, **k: autotuner_runs.append(1) or run(self, *a, **k)
    )
    args, kwargs = _args(16, 64, 64, 16, torch.bfloat16)
    for _ in range(3):
        launch.launch(kernel, (4,), args, kwargs)
    assert len(autotuner_runs) == 1 and len(kernel.fn.runs) == 3
    first, *later = kernel.fn.runs
    assert all(run == first for run in later)  # same arguments, grid and config
    assert first[1]["grid"] == (4,) and first[1]["BLOCK_M"] == 128 and first[1]["num_warps"] == 4


@pytest.mark.parametrize(
    "change",
    [
        dict(m=32),  # another M bucket
        dict(n=96),
        dict(k=96),
        dict(r=8),
        dict(dtype=torch.float16),
        dict(noise=True),
        dict(transposed=True),
    ],
)
def test_every_part_of_the_autotuning_key_is_a_new_key(tuned, change):
    """A launch that differs in any argument of the autotuner's key, or in a tensor's dtype,
    goes through the autotuner again and gets the config chosen for its own key."""
    kernel, choice = tuned
    base = dict(m=16, n=64, k=64, r=16, dtype=torch.bfloat16)
    args, kwargs = _args(**base)
    launch.launch(kernel, (1,), args, kwargs)
    choice[0] = 2  # the new key tunes to another config
    args, kwargs = _args(**(base | change))
    launch.launch(kernel, (1,), args, kwargs)
    launch.launch(kernel, (1,), args, kwargs)
    assert [run[1]["BLOCK_N"] for run in kernel.fn.runs] == [128, 64, 64]
    args, kwargs = _args(**base)  # and the first key keeps its own
    launch.launch(kernel, (1,), args, kwargs)
    assert kernel.fn.runs[-1][1]["BLOCK_N"] == 128


def test_m_within_one_bucket_is_the_same_key(tuned):
    kernel, choice = tuned
    args, kwargs = _args(17, 64, 64, 16, torch.bfloat16)
    launch.launch(kernel, (1,), args, kwargs)
    choice[0] = 2
    args, kwargs = _args(30, 64, 64, 16, torch.bfloat16)
    launch.launch(kernel, (1,), args, kwargs)
    assert [run[1]["BLOCK_N"] for run in kernel.fn.runs] == [128, 128]


def test_the_chosen_configs_are_bounded(tuned, monkeypatch):
    kernel, _ = tuned
    monkeypatch.setattr(launch, "_CHOSEN_MAX", 2)
    for k in (32, 48, 64, 80):
        args, kwargs = _args(16, 64, k, 16, torch.bfloat16)
        launch.launch(kernel, (1,), args, kwargs)
        assert len(launch._CHOSEN) <= 2


def test_a_stand_in_is_launched_as_a_kernel_every_time():
    """A launch counter's stand-in (no autotuner) is indexed and called at each launch."""
    args, kwargs = _args(16, 64, 64, 16, torch.float32)
    with LaunchCounter(stub=True) as launches:
        for _ in range(3):
            launch.launch(fused_linear._fused_lowrank_kernel, (1,), args, kwargs)
    assert launches.by_kernel == {"_fused_lowrank_kernel": 3}


@pytest.mark.parametrize("tensors", [0, 1, 3])
def test_the_key_holds_each_tensors_dtype_however_many(tensors):
    """The tensor arguments come back as a tuple for none, one or several tensors (one
    tensor is not iterated over), the key arguments by position and by keyword."""
    kernel = SimpleNamespace(arg_names=["t0", "t1", "t2", "K", "N", "FLAG"], keys=["K", "FLAG"])
    given = [torch.empty(2, dtype=torch.float16) for _ in range(tensors)]
    args = (*given, *[None] * (3 - tensors), 5, 6)  # t0, t1, t2 (None where no tensor), K, N
    signature = launch._signature(kernel, args, {"FLAG": True})
    assert tuple(map(launch._DTYPE, signature.tensors(args))) == (torch.float16,) * tensors
    assert signature.positional(args) == 5 and signature.keyword({"FLAG": True}) is True
