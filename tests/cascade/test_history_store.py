"""Kept updates on disk (history_dir): the same updates, figures and exports as in memory,
bit for bit; checkpoints that hold digests, verified on resume."""

import io
import shutil

import pytest
import torch
from torch import nn

from lorasc_kernels import Cascade, CascadeSettings, LoRASCConfig, inject_lorasc
from lorasc_kernels.cascade.history import UpdateFile

IN, HIDDEN, OUT = 12, 10, 6


def model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))
    inject_lorasc(model, LoRASCConfig(r=2, lora_alpha=4))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    return model, optimizer


def build(history_dir=None, seed=0):
    model, optimizer = model_and_optimizer(seed)
    cascade = Cascade(
        model,
        optimizer,
        steps_per_cascade=2,
        slow_rate=0.5,
        noise_lambda=0.1,
        keep_history=True,
        history_dir=history_dir,
    )
    cascade.track_metrics(every=1)
    return model, optimizer, cascade


def train(run, steps, seed=1):
    model, optimizer, cascade = run
    generator = torch.Generator().manual_seed(seed)
    figures = []
    for _ in range(steps):
        model(torch.randn(8, IN, generator=generator)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if cascade.step():
            figures.append(cascade.last_boundary)
    return figures


def same_history(a, b):
    assert list(a) == list(b)
    for name in a:
        assert len(a[name]) == len(b[name])
        for (b1, a1), (b2, a2) in zip(a[name], b[name], strict=True):
            assert torch.equal(b1, b2) and torch.equal(a1, a2)


def without_time(figures):
    return [{k: v for k, v in f.items() if k != "lorasc/merge_ms"} for f in figures]


def test_disk_history_equals_memory_history_and_exports(tmp_path):
    memory, disk = build(), build(tmp_path / "history")
    figures_memory, figures_disk = train(memory, 8), train(disk, 8)
    assert all(isinstance(v, UpdateFile) for v in disk[2].history.values())
    same_history(memory[2].history, disk[2].history)
    assert without_time(figures_memory) == without_time(figures_disk)
    assert figures_disk[-1]["lorasc/effective_rank"] > 2
    assert sorted(p.name for p in (tmp_path / "history").iterdir()) == [
        "layer-00000.f32",
        "layer-00001.f32",
    ]
    for max_rank in (None, 3):
        folders = [tmp_path / f"{kind}-{max_rank}" for kind in ("memory", "disk")]
        memory[2].export_peft_adapter(folders[0], max_rank=max_rank)
        disk[2].export_peft_adapter(folders[1], max_rank=max_rank)
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes()
    assert memory[2].export_errors == disk[2].export_errors
    for run in (memory, disk):
        run[0].load_state_dict(memory[0].state_dict())  # same weights, same final merge
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            memory[2].finalize().state_dict().values(),
            disk[2].finalize().state_dict().values(),
            strict=True,
        )
    )


@pytest.mark.parametrize("from_state", [False, True])
def test_checkpoint_holds_digests_and_resumes_bit_exact(tmp_path, from_state):
    folder = tmp_path / "history"
    whole = build(tmp_path / "whole")
    train(whole, 6)
    train(whole, 4, seed=2)
    first = build(folder)
    train(first, 6)
    saved = io.BytesIO()
    state = first[2].state_dict()
    assert all(set(entry) == {"count", "sha256"} for entry in state["history"].values())
    assert state["history"]["0"]["count"] == 3
    torch.save(
        {"model": first[0].state_dict(), "opt": first[1].state_dict(), "cascade": state}, saved
    )
    train(first, 2, seed=9)  # the run goes on past the checkpoint, then is resumed from it
    saved.seek(0)
    saved = torch.load(saved, weights_only=True)
    if from_state:
        model, optimizer = model_and_optimizer(seed=5)  # the weights loaded first
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["opt"])
        cascade = Cascade.from_state_dict(model, optimizer, saved["cascade"])
    else:
        model, optimizer, cascade = build(folder, seed=5)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["opt"])
        cascade.load_state_dict(saved["cascade"])
    cascade.track_metrics(every=1)
    assert len(cascade.history["0"]) == 3
    train((model, optimizer, cascade), 4, seed=2)
    same_history(whole[2].history, cascade.history)
    expected = whole[0].state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_a_moved_folder_loads_and_a_changed_one_is_refused(tmp_path):
    run = build(tmp_path / "a")
    train(run, 4)
    state = run[2].state_dict()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    moved = build(tmp_path / "b", seed=3)
    moved[2].load_state_dict(state)
    same_history(run[2].history, moved[2].history)

    torn = build(tmp_path / "a", seed=3)  # bytes past the saved count: ignored, then cut
    with open(tmp_path / "a" / "layer-00000.f32", "ab") as handle:
        handle.write(b"torn record")
    torn[2].load_state_dict(state)
    train(torn, 2)
    size = (tmp_path / "a" / "layer-00000.f32").stat().st_size
    assert size == 3 * torn[2].history["0"].record_bytes

    path = tmp_path / "b" / "layer-00001.f32"
    data = bytearray(path.read_bytes())
    data[5] ^= 1
    path.write_bytes(bytes(data))
    other = build(tmp_path / "b", seed=3)
    before = other[2].cascade_index, list(other[2].history["2"])
    with pytest.raises(ValueError, match=r"layer-00001.f32 does not hold the 2 updates"):
        other[2].load_state_dict(state)
    assert (other[2].cascade_index, list(other[2].history["2"])) == before
    path.write_bytes(bytes(data[:10]))
    with pytest.raises(ValueError, match="does not hold"):
        other[2].load_state_dict(state)
    path.unlink()
    with pytest.raises(ValueError, match="does not hold"):
        other[2].load_state_dict(state)


def test_saved_history_of_the_other_kind_or_form_is_refused(tmp_path):
    memory, disk = build(), build(tmp_path / "h")
    train(memory, 2)
    train(disk, 2)
    with pytest.raises(ValueError, match="kept on disk, and this Cascade keeps them in memory"):
        build()[2].load_state_dict(disk[2].state_dict())
    fresh = build(tmp_path / "other")[2]
    with pytest.raises(ValueError, match=r"must be \{'count', 'sha256'\}"):
        fresh.load_state_dict(memory[2].state_dict())
    state = disk[2].state_dict()
    bad = [
        ({"count": -1, "sha256": "0" * 64}, ValueError, r"\['count'\] must be >= 0"),
        ({"count": 1.0, "sha256": "0" * 64}, TypeError, r"\['count'\] must be an int"),
        ({"count": 1, "sha256": "xyz"}, ValueError, r"\['sha256'\] must be 64 hex digits"),
        ({"count": 1}, ValueError, r"must be \{'count', 'sha256'\}"),
    ]
    for entry, error, match in bad:
        with pytest.raises(error, match=match):
            fresh.load_state_dict({**state, "history": {**state["history"], "2": entry}})


def test_history_dir_setting_is_checked(tmp_path):
    with pytest.raises(ValueError, match="set keep_history=True"):
        CascadeSettings(history_dir=str(tmp_path))
    with pytest.raises(TypeError, match="history_dir must be None or a folder's path"):
        CascadeSettings(keep_history=True, history_dir=3)
    with pytest.raises(ValueError, match="history_dir must be a folder's path"):
        CascadeSettings(keep_history=True, history_dir="")
    assert CascadeSettings(keep_history=True, history_dir=tmp_path).history_dir == str(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot be a folder"):
        build(tmp_path / "file")


def test_an_append_that_fails_is_finished_by_the_next_step(tmp_path, monkeypatch):
    whole = build(tmp_path / "whole")
    train(whole, 4)
    cut = build(tmp_path / "cut")
    append = UpdateFile.append
    calls = []

    def failing(self, pair):
        calls.append(self.path.name)
        if len(calls) == 4:  # the second boundary's second layer: a full disk
            raise OSError(28, "No space left on device")
        return append(self, pair)

    monkeypatch.setattr(UpdateFile, "append", failing)
    model, optimizer, cascade = cut
    with pytest.raises(OSError, match="No space"):
        train(cut, 4)
    assert cascade.step()  # finishes the boundary: the failed append is written once
    same_history(whole[2].history, cascade.history)
