"""Files that are whole or absent, paired files that refuse to mix, and the optimizer step
hook under threads: faults injected as a cluster produces them (a kill in the middle of a
write, a full disk, threads building and finalizing Cascades while others step)."""

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from lorasc_kernels import Cascade, LoRASCLinear
from lorasc_kernels._files import atomic_write
from lorasc_kernels.cascade.optimizers import OptimizerTracker
from tests.helpers import trainer_args_and_state

ROOT = Path(__file__).resolve().parents[2]

KILLED_WRITE = """
import os, sys
from pathlib import Path
from lorasc_kernels._files import atomic_write

def half_then_killed(file):
    file.write_bytes(b"new" * 1000)
    os.kill(os.getpid(), 9)  # SIGKILL in the middle of the save

atomic_write(Path(sys.argv[1]), half_then_killed)
"""


def test_a_write_killed_midway_leaves_the_previous_file(tmp_path):
    target = tmp_path / "lorasc_cascade.pt"
    target.write_bytes(b"old state")
    done = subprocess.run(
        [sys.executable, "-c", KILLED_WRITE, str(target)],
        env={"PYTHONPATH": str(ROOT)},
        capture_output=True,
    )
    assert done.returncode == -9
    assert target.read_bytes() == b"old state"


def test_a_full_disk_leaves_the_previous_file_and_no_partial(tmp_path):
    target = tmp_path / "state.pt"
    target.write_bytes(b"old state")

    def full_disk(file):
        file.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, full_disk)
    assert target.read_bytes() == b"old state"
    assert [path.name for path in tmp_path.iterdir()] == ["state.pt"]


def _peft_run_saved_by_the_callback(tmp_path, folder_name, seed):
    """A PEFT model a Cascade trained, saved by LoRASCCallback.on_save into
    ``tmp_path/folder_name``; returns the callback's module, Trainer-like args and state."""
    peft = pytest.importorskip("peft")
    hf_callback = pytest.importorskip("lorasc_kernels.integrations.hf_callback")
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0", "2"]))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    callback = hf_callback.LoRASCCallback(steps_per_cascade=2, noise_lambda=0.1)
    args, state = trainer_args_and_state(tmp_path, 0)
    callback.on_train_begin(args, state, None, model=model, optimizer=optimizer)
    for _ in range(3):
        model(torch.randn(4, 6)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        callback.on_optimizer_step(args, state, None)
    state.global_step = 3
    args.output_dir = str(tmp_path / folder_name)
    callback.on_save(args, state, None)
    return hf_callback, args, state


def test_a_peft_pair_from_two_saves_is_refused_by_name(tmp_path):
    """A save cut off between the two files (the base weights rewritten, the state not):
    the state names its companion by digest, so the mix is refused before any copy."""
    hf_callback, args, state = _peft_run_saved_by_the_callback(tmp_path, "a", seed=0)
    _peft_run_saved_by_the_callback(tmp_path, "b", seed=1)
    folder_a = tmp_path / "a" / "checkpoint-3"
    folder_b = tmp_path / "b" / "checkpoint-3"
    assert not list(folder_a.glob(".*partial"))
    (folder_b / "lorasc_cascade.peft_base.pt").replace(folder_a / "lorasc_cascade.peft_base.pt")
    (folder_a / "lorasc_cascade.binding.json").unlink()  # cut off before on_save bound them
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0", "2"]))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    callback = hf_callback.LoRASCCallback(steps_per_cascade=2, noise_lambda=0.1)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    args.output_dir = str(tmp_path / "a")
    with pytest.raises(ValueError, match=r"peft_base.pt is not the file .*lorasc_cascade.pt"):
        callback.on_train_begin(args, state, None, model=model, optimizer=optimizer)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())


def test_a_truncated_base_weights_file_is_refused_naming_it(tmp_path):
    hf_callback, args, state = _peft_run_saved_by_the_callback(tmp_path, "a", seed=0)
    folder = tmp_path / "a" / "checkpoint-3"
    companion = folder / "lorasc_cascade.peft_base.pt"
    state_file = folder / "lorasc_cascade.pt"
    saved = torch.load(state_file, weights_only=True)
    companion.write_bytes(companion.read_bytes()[:100])
    saved.pop(hf_callback.PAIR_KEY)  # as a checkpoint written before the pair was bound
    torch.save(saved, state_file)
    (folder / "lorasc_cascade.binding.json").unlink()
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0", "2"]))
    callback = hf_callback.LoRASCCallback(steps_per_cascade=2, noise_lambda=0.1)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match=r"merged base weights in .*peft_base.pt cannot be read"):
        callback.on_train_begin(args, state, None, model=model, optimizer=optimizer)


def _small_run():
    layer = LoRASCLinear(8, 8, r=2, backend="torch")
    model = nn.Sequential(layer)
    optimizer = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1)
    return model, optimizer


def test_the_step_hook_holds_while_threads_build_and_finalize_cascades():
    runs = [_small_run() for _ in range(50)]
    cascades = [Cascade(model, optimizer) for model, optimizer in runs]
    model, optimizer = _small_run()
    Cascade(model, optimizer)
    errors, stop = [], threading.Event()

    def churn():
        try:
            while not stop.is_set():
                other, other_optimizer = _small_run()
                Cascade(other, other_optimizer).finalize()
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(300):
            model(torch.randn(2, 8)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert errors == []
    assert len(cascades) == 50


def test_a_step_of_an_optimizer_seen_before_asks_no_tracker(monkeypatch):
    """Trackers are told of an optimizer once (and again only after a new Cascade started
    or its parameters changed), not at every step of every optimizer."""
    runs = [_small_run() for _ in range(20)]
    cascades = [Cascade(model, optimizer) for model, optimizer in runs]
    model, optimizer = runs[0]
    calls = []
    note = OptimizerTracker._note
    monkeypatch.setattr(
        OptimizerTracker, "_note", lambda self, opt: (calls.append(opt), note(self, opt))
    )
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()  # maybe the first step the trackers hear of
    calls.clear()
    for _ in range(3):
        optimizer.step()
    assert calls == []  # nothing new: no tracker asked, whatever their number
    late = Cascade(*_small_run())  # a new tracker must see it once
    optimizer.step()
    assert len(calls) >= len(cascades) + 1 and late.optimizer is not optimizer


# -- boundaries and finalize() cut off by an error, then called again ---------------------------

LAYERS = 5


def _five_layers():
    torch.manual_seed(0)
    model = nn.Sequential(
        *[LoRASCLinear(6, 6, r=2, backend="torch") for _ in range(LAYERS)], nn.Linear(6, 2)
    )
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=1e-2)
    cascade = Cascade(
        model,
        optimizer,
        steps_per_cascade=2,
        noise_lambda=0.1,
        slow_rate=0.5,
        keep_history=True,
        seed=4,
    )
    return model, optimizer, cascade


def _steps(model, optimizer, cascade, steps, fault=None):
    """``steps`` training steps; ``fault()`` (if given) arms an error for the next boundary,
    which is caught and the step made again, as a user retries after an out-of-memory."""
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        model(torch.randn(3, 6, generator=generator)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if fault is not None and step == 1:
            with fault(), pytest.raises((RuntimeError, KeyboardInterrupt), match="injected"):
                cascade.step()
        cascade.step()


class _FailingMerge:
    """Makes the ``at``-th merge kernel call (0-based) from now raise once."""

    def __init__(self, monkeypatch, at, error=RuntimeError):
        self.monkeypatch, self.at, self.error = monkeypatch, at, error

    def __call__(self):
        from lorasc_kernels import ops

        merge = ops.merge_
        calls = []

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == self.at + 1:
                raise self.error("injected: out of memory in the merge")
            return merge(*args, **kwargs)

        self.monkeypatch.setattr(ops, "merge_", failing)
        return _Restore(self.monkeypatch)


class _Restore:
    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.monkeypatch.undo()
        return False


def _same_run(a, b):
    (model_a, _, cascade_a), (model_b, _, cascade_b) = a, b
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert all(torch.equal(state_a[key], state_b[key]) for key in state_a), [
        key for key in state_a if not torch.equal(state_a[key], state_b[key])
    ]
    history_a, history_b = cascade_a.history, cascade_b.history
    assert [len(v) for v in history_a.values()] == [len(v) for v in history_b.values()]
    for name in history_a:
        for (b1, a1), (b2, a2) in zip(history_a[name], history_b[name], strict=True):
            assert torch.equal(b1, b2) and torch.equal(a1, a2)
    assert (cascade_a.cascade_index, cascade_a.steps_in_cascade) == (
        cascade_b.cascade_index,
        cascade_b.steps_in_cascade,
    )


@pytest.mark.parametrize("at", range(LAYERS))
def test_a_boundary_cut_off_at_any_layer_then_retried_equals_the_uninterrupted_run(monkeypatch, at):
    whole = _five_layers()
    _steps(*whole, steps=6)
    cut = _five_layers()
    _steps(*cut, steps=6, fault=_FailingMerge(monkeypatch, at))
    _same_run(whole, cut)


@pytest.mark.parametrize("at", range(LAYERS))
def test_a_finalize_interrupted_at_any_layer_then_called_again_equals_one_finalize(monkeypatch, at):
    whole = _five_layers()
    _steps(*whole, steps=3)
    final = whole[2].finalize()
    cut = _five_layers()
    _steps(*cut, steps=3)
    with _FailingMerge(monkeypatch, at, KeyboardInterrupt)():
        with pytest.raises(KeyboardInterrupt, match="injected"):
            cut[2].finalize()
    with pytest.raises(RuntimeError, match="cut off by an error"):
        cut[2].state_dict()  # half done: refused until finished
    again = cut[2].finalize()
    assert all(type(module) is nn.Linear for module in again)
    expected, got = final.state_dict(), again.state_dict()
    assert all(torch.equal(expected[key], got[key]) for key in expected)
