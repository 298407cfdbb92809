"""Saves written one tensor at a time: the safetensors writer against safetensors' own
bytes, Cascade.save_merged against merged_state_dict() bit for bit, and the peak memory of
both (op outputs alive at once, counted on the CPU; nothing timed)."""

import json
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from benchmarks.bench_scaling import PeakOutputs
from lorasc_kernels import Cascade, LoRASCConfig, _files, inject_lorasc
from lorasc_kernels._files import Pending, write_safetensors

WIDTH, LAYERS = 48, 5


def test_writer_gives_safetensors_bytes_making_one_tensor_at_a_time(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "b.w": torch.randn(3, 5),
        "a.w": torch.randn(4).bfloat16(),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "mask": torch.tensor([True, False]),
        "codes": torch.randn(7).to(torch.float8_e4m3fn),
        "strided": torch.randn(6, 4).T,
    }
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, tmp_path / "ref.st", {"format": "pt"}
    )
    alive, refs = [], []

    def maker(value):
        def make():
            alive.append(sum(ref() is not None for ref in refs))
            made = value.clone()
            refs.append(weakref.ref(made))
            return made

        return Pending(tuple(value.shape), value.dtype, make)

    pending = {k: maker(v) if k != "c" else v for k, v in tensors.items()}
    write_safetensors(tmp_path / "ours.st", pending, {"format": "pt"})
    assert (tmp_path / "ours.st").read_bytes() == (tmp_path / "ref.st").read_bytes()
    assert alive == [0] * (len(tensors) - 1)  # each made after the one before was dropped
    save_file({}, tmp_path / "empty-ref.st")
    write_safetensors(tmp_path / "empty.st", {})
    assert (tmp_path / "empty.st").read_bytes() == (tmp_path / "empty-ref.st").read_bytes()


def test_writer_refuses_a_tensor_unlike_its_plan_or_dtype(tmp_path):
    wrong = Pending((2, 3), torch.float32, lambda: torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"w: made a torch.float32 tensor of shape \(3, 2\)"):
        write_safetensors(tmp_path / "x.st", {"w": wrong})
    with pytest.raises(TypeError, match="does not store torch.complex64"):
        write_safetensors(tmp_path / "x.st", {"z": torch.zeros(2, dtype=torch.complex64)})


def build(dtype=torch.float32):
    torch.manual_seed(1)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)], nn.LayerNorm(WIDTH))
    model.to(dtype)
    inject_lorasc(model, LoRASCConfig(r=2, lora_alpha=4, target_modules=["0", "1", "2", "3", "4"]))
    model[5].requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=3e-2)
    cascade = Cascade(model, optimizer, steps_per_cascade=2, slow_rate=0.5, noise_lambda=0.1)
    x = torch.randn(8, WIDTH, dtype=dtype)
    for _ in range(3):  # one boundary, then one step into the next cascade
        model(x).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        cascade.step()
    return model, cascade


def loaded(folder):
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    return state


def same(state, expected):
    assert list(state) == list(expected) or sorted(state) == sorted(expected)
    for key, value in expected.items():
        got = state[key]
        assert got.dtype == value.dtype and got.shape == value.shape, key
        assert torch.equal(got.view(torch.uint8), value.contiguous().view(torch.uint8)), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_merged_equals_merged_state_dict_in_one_file_and_in_shards(tmp_path, dtype):
    model, cascade = build(dtype)
    expected = cascade.merged_state_dict()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one = cascade.save_merged(tmp_path / "one")
    assert sorted(p.name for p in one.iterdir()) == ["model.safetensors"]
    same(loaded(one), expected)
    pair_bytes = 2 * (WIDTH * WIDTH + WIDTH) * dtype.itemsize  # two layers, with biases
    sharded = cascade.save_merged(tmp_path / "sharded", max_shard_bytes=pair_bytes)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert set(load_file(sharded / shards[0])) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert set(index["weight_map"]) == set(expected)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(
        v.numel() * v.element_size() for v in expected.values()
    )
    for name in shards:  # each shard holds what the index says, and within the limit
        keys = load_file(sharded / name)
        assert {k for k, v in index["weight_map"].items() if v == name} == set(keys)
    same(loaded(sharded), expected)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the same save again, whole: the earlier shards and index are removed
    cascade.save_merged(tmp_path / "sharded")
    assert sorted(p.name for p in sharded.iterdir()) == ["model.safetensors"]
    same(loaded(sharded), expected)


def test_save_merged_refuses_bad_limits_and_a_failed_write_changes_nothing(tmp_path, monkeypatch):
    model, cascade = build()
    with pytest.raises(ValueError, match="max_shard_bytes must be >= 1"):
        cascade.save_merged(tmp_path, max_shard_bytes=0)
    with pytest.raises(TypeError, match="max_shard_bytes must be an int"):
        cascade.save_merged(tmp_path, max_shard_bytes=1.5)
    folder = cascade.save_merged(tmp_path / "m", max_shard_bytes=WIDTH * WIDTH * 8)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    write, calls = _files.write_safetensors, []

    def full_disk(path, *args):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return write(path, *args)

    monkeypatch.setattr("lorasc_kernels.cascade.export.write_safetensors", full_disk)
    with pytest.raises(OSError, match="No space"):
        cascade.save_merged(folder, max_shard_bytes=WIDTH * WIDTH * 4)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files  # no partial left
    monkeypatch.undo()
    cascade.finalize()
    with pytest.raises(RuntimeError, match=r"save_merged\(\) after finalize"):
        cascade.save_merged(tmp_path / "late")


def test_save_merged_holds_one_merged_layer_at_a_time(tmp_path):
    """merged_state_dict() holds every merged weight at its end; save_merged at most about
    one layer's worth of new tensors (the merge's temporaries included) at any time."""
    _, cascade = build()
    layer_bytes = WIDTH * WIDTH * 4
    with PeakOutputs() as whole:
        state = cascade.merged_state_dict()
    del state
    with PeakOutputs() as streamed:
        cascade.save_merged(tmp_path / "m")
    assert whole.peak >= LAYERS * layer_bytes  # what the bound below would catch
    assert streamed.peak <= 3 * layer_bytes, streamed.peak


def test_merged_state_dict_to_a_device_holds_one_merged_layer_where_w_lives():
    _, cascade = build()
    layer_bytes = WIDTH * WIDTH * 4
    with PeakOutputs("cpu") as on_cpu:
        state = cascade.merged_state_dict(device="meta")
    assert all(value.device.type == "meta" for value in state.values())
    assert on_cpu.peak <= 3 * layer_bytes, on_cpu.peak
    with PeakOutputs("cpu") as kept:
        state = cascade.merged_state_dict()
    assert kept.peak >= LAYERS * layer_bytes
