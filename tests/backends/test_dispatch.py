"""The Triton backend's choice of GEMM variant (backends/triton/gemm_dispatch.py): the
switch, the candidates of a call, the choice by measurement with a fake timing source,
its per-process cache, and the ``addmm`` composition against float64."""

import json
import os
import warnings

import pytest
import torch

from lorasc_kernels.backends import reference
from lorasc_kernels.backends.specs import DropoutSpec, NoiseSpec
from lorasc_kernels.backends.triton import dispatch_store, fused_linear, gemm_dispatch
from lorasc_kernels.formats.quantize import quantize
from tests.backend_params import DEVICE
from tests.helpers import KERNEL_TOLERANCE, rel_error

CPU = torch.device("cpu")
ALL = gemm_dispatch.VARIANTS


class FakeTimer:
    """Times a variant as ``seconds[variant]``: runs it, reads which one ran from ``ran``."""

    def __init__(self, seconds: dict[str, float]):
        self.seconds, self.ran, self.calls = seconds, [], 0

    def __call__(self, run) -> float:
        self.calls += 1
        run()
        return self.seconds[self.ran[-1]]


def _choose(dispatch, key, options=ALL, device=CPU):
    return dispatch.choose(device, key, options, dispatch.timer.ran.append)


def test_measure_keeps_the_fastest_per_key_for_the_process(monkeypatch):
    monkeypatch.setattr(gemm_dispatch, "mode", "measure")
    timer = FakeTimer({"tiled": 3.0, "persistent": 1.0, "addmm": 2.0})
    dispatch = gemm_dispatch.Dispatch(timer)
    assert _choose(dispatch, "a") == "persistent"
    assert timer.ran == list(ALL) and timer.calls == 3
    timer.seconds["addmm"] = 0.5  # a later change of speed is not seen: cached per key
    assert _choose(dispatch, "a") == "persistent" and timer.calls == 3
    assert _choose(dispatch, "b") == "addmm" and timer.calls == 6
    assert _choose(dispatch, "c", options=("tiled", "persistent")) == "persistent"
    assert dispatch.chosen == {"a": "persistent", "b": "addmm", "c": "persistent"}


def test_a_variant_that_fails_while_measured_is_left_out_with_a_warning(monkeypatch):
    monkeypatch.setattr(gemm_dispatch, "mode", "measure")

    def run(variant):
        if variant != "tiled":
            raise RuntimeError(f"{variant} does not compile here")

    dispatch = gemm_dispatch.Dispatch(lambda fn: fn() or 1.0)
    with pytest.warns(UserWarning, match="'persistent' failed on k.*does not compile here"):
        assert dispatch.choose(CPU, "k", ("tiled", "persistent"), run) == "tiled"
    dispatch = gemm_dispatch.Dispatch(lambda fn: fn() or 1.0)
    with pytest.raises(RuntimeError, match="does not compile"):  # the fallback's error
        dispatch.choose(CPU, "k", ("tiled", "addmm"), lambda variant: run("persistent"))
    assert not dispatch.chosen


def test_forced_variant_where_it_applies_else_tiled(monkeypatch):
    timer = FakeTimer({})
    dispatch = gemm_dispatch.Dispatch(timer)
    for variant in ALL:
        monkeypatch.setattr(gemm_dispatch, "mode", variant)
        assert _choose(dispatch, "k") == variant
        assert _choose(dispatch, "k", options=("tiled",)) == "tiled"
    monkeypatch.setattr(gemm_dispatch, "mode", "fastest")
    with pytest.raises(ValueError, match=gemm_dispatch.SWITCH):
        _choose(dispatch, "k")
    assert timer.calls == 0 and not dispatch.chosen


def test_forced_mode_is_checked_and_restored(monkeypatch):
    """``forced_mode`` refuses an unknown mode before changing anything, and puts the
    previous mode back on the way out, an error included."""
    monkeypatch.setattr(gemm_dispatch, "mode", "addmm")
    with pytest.raises(ValueError, match="'fastest'"):
        with gemm_dispatch.forced_mode("fastest"):
            pass
    assert gemm_dispatch.mode == "addmm"
    with pytest.raises(RuntimeError), gemm_dispatch.forced_mode("persistent"):
        assert gemm_dispatch.mode_for(False) == "persistent"
        raise RuntimeError
    assert gemm_dispatch.mode == "addmm"
    with gemm_dispatch.forced_mode(None):
        assert gemm_dispatch.mode_for(False) == "tiled"
        assert gemm_dispatch.mode_for(True) == "measure"


def test_the_mode_is_the_environment_switch_as_set_at_import(tmp_path):
    """``LORASC_GEMM_VARIANT`` is read when the module is imported (a fresh process here);
    set later in that process, it changes nothing: the mode is a module attribute."""
    import subprocess
    import sys

    code = (
        "import os\n"
        "from lorasc_kernels.backends.triton import gemm_dispatch as d\n"
        "os.environ[d.SWITCH] = 'tiled'\n"
        "print(d.mode, d.mode_for(False))\n"
    )
    env = dict(os.environ, **{gemm_dispatch.SWITCH: "persistent"})
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["persistent", "persistent"]


def test_default_measures_on_cuda_only(monkeypatch):
    monkeypatch.setattr(gemm_dispatch, "mode", None)
    timer = FakeTimer({"tiled": 2.0, "persistent": 1.0, "addmm": 3.0})
    dispatch = gemm_dispatch.Dispatch(timer)
    assert _choose(dispatch, "k", device=CPU) == "tiled" and timer.calls == 0
    if DEVICE == "cuda":
        assert _choose(dispatch, "k", device=torch.device("cuda")) == "persistent"


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU tensors run in the interpreter only")
def test_measure_asked_for_on_cpu_tensors_runs_tiled_and_says_so_once(monkeypatch):
    """The GPU timer cannot time the interpreter: ``measure`` falls back to ``tiled``."""
    monkeypatch.setattr(gemm_dispatch, "mode", "measure")
    monkeypatch.setattr(gemm_dispatch, "DISPATCH", gemm_dispatch.Dispatch())
    p, q, u, v = (
        torch.randn(*shape).to(torch.bfloat16) for shape in ((16, 32), (16, 32), (16, 2), (16, 2))
    )
    with pytest.warns(UserWarning, match="measure times GPU kernels; on cpu tensors"):
        got = gemm_dispatch.lowrank_gemm(p, q, None, u, v, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gemm_dispatch.lowrank_gemm(p, q, None, u, v, 0.5)
    assert torch.equal(got, fused_linear.tiled_lowrank_gemm(p, q, None, u, v, 0.5))
    assert not gemm_dispatch.DISPATCH.chosen


def test_candidates_of_a_call():
    p = torch.randn(16, 64, device=DEVICE).to(torch.bfloat16)
    weight = torch.randn(32, 64, device=DEVICE).to(torch.bfloat16)
    u = torch.randn(16, 4, device=DEVICE).to(torch.bfloat16)
    v = torch.randn(32, 4, device=DEVICE).to(torch.bfloat16)
    scaled = quantize(weight.float(), torch.float8_e4m3fn)

    def of(*args):
        return gemm_dispatch.candidates(*args)

    old_gpu = DEVICE == "cuda" and torch.cuda.get_device_capability() < (9, 0)
    tma = () if old_gpu else ("persistent",)
    assert of(p, weight, None, u, v, None) == ("tiled", *tma, "addmm")
    assert of(p, weight, None, u, v, DropoutSpec(1, 0.1)) == ("tiled", *tma)  # mask
    assert of(p, weight, u[0].float(), u, v, None) == ("tiled", *tma)  # fp32 bias
    assert of(p, scaled, None, u, v, None) == ("tiled", *tma)  # fp8: no addmm
    assert of(p.float(), weight.float(), None, None, None, None) == ("tiled",)


@pytest.mark.parametrize("q_transposed", [False, True], ids=["W", "W_t"])
def test_addmm_composition_matches_float64_with_the_references_noise(q_transposed):
    p = torch.randn(20, 32, device=DEVICE).to(torch.float16)
    weight = (torch.randn(24, 32, device=DEVICE) / 6).to(torch.float16)
    n = 24
    if q_transposed:  # the dX GEMM: P (20, 24) · W (24, 32), V = A (3, 32) as stored
        p, n = p[:, :24].contiguous(), 32
    u = torch.randn(20, 3, device=DEVICE).half()
    v = torch.randn(*((3, n) if q_transposed else (n, 3)), device=DEVICE).half()
    bias = torch.randn(n, device=DEVICE).half()
    noise = NoiseSpec(77, 0.05)
    got = gemm_dispatch.addmm_lowrank_gemm(p, weight, bias, u, v, 1.5, noise, q_transposed)
    noisy = reference.noisy_weight(weight, noise.seed, noise.scale).double()
    expected = (
        p.double() @ (noisy if q_transposed else noisy.t())
        + bias.double()
        + 1.5 * u.double() @ (v.double() if q_transposed else v.double().t())
    )
    assert got.dtype == torch.float16
    assert rel_error(got, expected) < KERNEL_TOLERANCE[torch.float16]


def test_primitive_returns_the_measured_variants_result(monkeypatch):
    """Through the primitive: every candidate is timed once, the fastest one's output is
    returned, and the next call of the same problem measures nothing."""
    monkeypatch.setattr(gemm_dispatch, "mode", "measure")
    timer = FakeTimer({"tiled": 2.0, "persistent": 3.0, "addmm": 1.0})
    monkeypatch.setattr(gemm_dispatch, "DISPATCH", gemm_dispatch.Dispatch(timer))
    for variant in ALL:
        launcher = f"{variant}_lowrank_gemm"
        real = getattr(gemm_dispatch, launcher)

        def record(*args, _variant=variant, _real=real, **kwargs):
            timer.ran.append(_variant)
            return _real(*args, **kwargs)

        monkeypatch.setattr(gemm_dispatch, launcher, record)
    p = torch.randn(16, 32, device=DEVICE).to(torch.bfloat16)
    q = torch.randn(16, 32, device=DEVICE).to(torch.bfloat16)
    u = torch.randn(16, 2, device=DEVICE).to(torch.bfloat16)
    v = torch.randn(16, 2, device=DEVICE).to(torch.bfloat16)
    options = gemm_dispatch.candidates(p, q, None, u, v, None)
    got = gemm_dispatch.lowrank_gemm(p, q, None, u, v, 0.5)
    assert timer.ran == [*options, "addmm"]
    assert torch.equal(got, gemm_dispatch.addmm_lowrank_gemm(p, q, None, u, v, 0.5))
    gemm_dispatch.lowrank_gemm(p, q, None, u, v, 0.5)
    assert timer.calls == len(options) and timer.ran[-1] == "addmm"
    [key] = gemm_dispatch.DISPATCH.chosen
    assert str(key) == f"forward M<=16 N=16 K=32 r=2 bfloat16 on cpu, of {'/'.join(options)}"
    tiled = fused_linear.tiled_lowrank_gemm(p, q, None, u, v, 0.5)
    assert rel_error(got, tiled) < KERNEL_TOLERANCE[torch.bfloat16]


def test_benchmark_providers_pin_their_variant_for_forward_and_backward(monkeypatch):
    """The timed callable of ``ours-triton@<variant>`` (wrapped by ``providers.pinned``, as
    every provider's is) runs its variant in the forward and in the backward's dX GEMM, in
    turns with another provider's, and in a backward-only timing whose forward ran
    before another provider's call."""
    from benchmarks import providers
    from benchmarks.bench_linear import step_fn

    ran = []
    for variant in providers.TRITON_VARIANTS:
        launcher = f"{variant}_lowrank_gemm"
        real = getattr(gemm_dispatch, launcher)

        def record(*args, _variant=variant, _real=real, **kwargs):
            ran.append(_variant)
            return _real(*args, **kwargs)

        monkeypatch.setattr(gemm_dispatch, launcher, record)
    # recorded, so that the switch the pinned calls set is undone after the test
    monkeypatch.setattr(gemm_dispatch, "mode", "tiled")
    tensors = providers.Tensors.draw(providers.Problem(16, 32, 16, 2, torch.bfloat16, DEVICE))

    def timed(name, mode):
        step = step_fn(mode, providers.build(name, tensors), tensors)
        return providers.pinned(step, providers.variant_of(name))

    persistent = timed("ours-triton@persistent", "forward+backward")
    tiled = timed("ours-triton@tiled", "forward+backward")
    persistent()
    tiled()
    assert ran == ["persistent", "persistent", "tiled", "tiled"]
    ran.clear()
    backward = timed("ours-triton@persistent", "backward")  # its forward: not timed
    tiled()
    ran.clear()
    backward()
    assert ran == ["persistent"]


def _stored(folder, seconds, key="k"):
    """A fresh Dispatch (another process) over the store in ``folder``: its choice for
    ``key`` and its timer."""
    timer = FakeTimer(seconds)
    dispatch = gemm_dispatch.Dispatch(timer, store=dispatch_store.ChoiceStore(folder))
    return _choose(dispatch, key), timer


def test_a_measured_choice_is_the_choice_of_every_later_process(monkeypatch, tmp_path):
    monkeypatch.setattr(gemm_dispatch, "mode", "measure")
    first, timer = _stored(tmp_path, {"tiled": 3.0, "persistent": 1.0, "addmm": 2.0})
    assert first == "persistent" and timer.calls == 3
    # a later process, where addmm would measure faster: it measures nothing, adopts the file
    later, timer = _stored(tmp_path, {"tiled": 3.0, "persistent": 2.0, "addmm": 1.0})
    assert later == "persistent" and timer.calls == 0
    other, timer = _stored(tmp_path, {"tiled": 3.0, "persistent": 2.0, "addmm": 1.0}, "k2")
    assert other == "addmm" and timer.calls == 3  # another problem: measured, then stored
    [path] = tmp_path.glob("gemm-variants-cpu-*.json")
    data = json.loads(path.read_text())
    assert data == {"format": 1, "choices": {"k": "persistent", "k2": "addmm"}}


def test_two_processes_measuring_at_once_settle_on_the_first_stored(monkeypatch, tmp_path):
    """The second one to store finds the first one's choice in the file and adopts it."""
    monkeypatch.setattr(gemm_dispatch, "mode", "measure")
    store = dispatch_store.ChoiceStore(tmp_path)

    class Racing(FakeTimer):
        def __call__(self, run):  # while this process measures, another stores "addmm"
            if self.calls == 0:
                store.settle(CPU, "k", "addmm")
            return super().__call__(run)

    timer = Racing({"tiled": 3.0, "persistent": 1.0, "addmm": 2.0})
    dispatch = gemm_dispatch.Dispatch(timer, store=store)
    assert _choose(dispatch, "k") == "addmm" and dispatch.chosen == {"k": "addmm"}


def test_an_unusable_choice_file_is_reported_once_and_choices_stay_in_memory(monkeypatch, tmp_path):
    monkeypatch.setattr(gemm_dispatch, "mode", "measure")
    store = dispatch_store.ChoiceStore(tmp_path)
    store.path(CPU).write_text("{not json")
    timer = FakeTimer({"tiled": 3.0, "persistent": 1.0, "addmm": 2.0})
    dispatch = gemm_dispatch.Dispatch(timer, store=store)
    with pytest.warns(UserWarning, match="cannot be read.*choices kept in memory only"):
        assert _choose(dispatch, "k") == "persistent"
    assert json.loads(store.path(CPU).read_text())["choices"] == {"k": "persistent"}
    blocked = dispatch_store.ChoiceStore(tmp_path / "a-file")
    (tmp_path / "a-file").write_text("")  # its folder is a file: nothing can be written
    dispatch = gemm_dispatch.Dispatch(timer, store=blocked)
    with pytest.warns(UserWarning, match="cannot be (read|written)"):
        assert _choose(dispatch, "k") == "persistent"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once per file
        assert _choose(dispatch, "k3") == "persistent"


def test_the_choice_file_is_per_gpu_model_and_versions(monkeypatch, tmp_path):
    store = dispatch_store.ChoiceStore(tmp_path)
    path = store.path(CPU)
    assert path.parent == tmp_path and path.name.startswith("gemm-variants-cpu-")
    monkeypatch.setattr(dispatch_store.triton, "__version__", "0.0-other")
    assert store.path(CPU) != path
    monkeypatch.setenv(dispatch_store.DIR_SWITCH, "")
    assert dispatch_store.ChoiceStore.from_environment() is None
    monkeypatch.setenv(dispatch_store.DIR_SWITCH, str(tmp_path))
    assert dispatch_store.ChoiceStore.from_environment().folder == tmp_path


def test_a_problem_key_is_filed_without_its_device():
    key = gemm_dispatch.ProblemKey(
        torch.device("cpu"), 16, 64, 32, 4, torch.bfloat16, True, False, False, True, ALL
    )
    assert key.words(device=False) == "dX M<=16 N=64 K=32 r=4 bfloat16 +bias, of " + "/".join(ALL)
    assert str(key) == "dX M<=16 N=64 K=32 r=4 bfloat16 +bias on cpu, of " + "/".join(ALL)


def test_a_call_of_a_known_shape_but_another_alignment_is_another_problem(monkeypatch):
    """The problems of calls are looked up by their layout: a ``P`` of the same shape and
    strides whose base pointer is not 16-byte aligned has no TMA variant, and so another
    key, as :func:`candidates` says when asked afresh."""
    monkeypatch.setattr(gemm_dispatch, "mode", "measure")
    monkeypatch.setattr(gemm_dispatch, "DISPATCH", gemm_dispatch.Dispatch(lambda run: 1.0))
    base = torch.randn(16, 40, device=DEVICE).to(torch.bfloat16)
    aligned, shifted = base[:, :32], base[:, 1:33]  # same shape and strides, 2 bytes apart
    q = torch.randn(16, 32, device=DEVICE).to(torch.bfloat16)
    u = torch.randn(16, 2, device=DEVICE).to(torch.bfloat16)
    v = torch.randn(16, 2, device=DEVICE).to(torch.bfloat16)
    for p in (aligned, shifted, aligned):
        gemm_dispatch.lowrank_gemm(p, q, None, u, v, 0.5)
    keys = list(gemm_dispatch.DISPATCH.chosen)
    assert [key.candidates for key in keys] == [
        gemm_dispatch.candidates(p, q, None, u, v, None) for p in (aligned, shifted)
    ]
    assert "persistent" not in keys[1].candidates
