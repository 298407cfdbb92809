"""Cascade.merged_state_dict: a plain model's state dict, mid-run, changing nothing."""

import copy

import pytest
import torch
from torch import nn

from lorasc_kernels import Cascade, LoRASCConfig, inject_lorasc
from tests.helpers import rel_error

IN, HIDDEN, OUT = 12, 10, 4


def plain_model(dtype=torch.float32):
    return nn.Sequential(
        nn.Linear(IN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, OUT),
    ).to(dtype)


def lorasc_run(dtype=torch.float32, weight_format=None, train_head=False, **settings):
    """A LoRASC model over ``plain_model`` (first two linears), its optimizer and Cascade."""
    torch.manual_seed(0)
    model = plain_model(dtype)
    inject_lorasc(
        model,
        LoRASCConfig(
            r=2,
            lora_alpha=4,
            target_modules=["0", "2"],
            lora_dtype=torch.float32,
            weight_format=weight_format,
            backend="torch",
        ),
    )
    if train_head:
        model[4].weight.requires_grad_(True)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    return model, optimizer, Cascade(model, optimizer, steps_per_cascade=3, **settings)


def train(model, optimizer, cascade, steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, IN, generator=generator).to(model[4].weight.dtype)
        model(x).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        cascade.step()


def snapshot(model, optimizer, cascade):
    return (
        copy.deepcopy(model.state_dict()),
        copy.deepcopy(optimizer.state_dict()),
        copy.deepcopy(cascade.state_dict()),
    )


def test_a_plain_model_loaded_with_it_computes_what_the_running_model_computes():
    model, optimizer, cascade = lorasc_run(noise_mode="off")
    train(model, optimizer, cascade, 4)  # mid-cascade: a trained fast LoRA to merge
    before = snapshot(model, optimizer, cascade)
    merged = cascade.merged_state_dict()
    assert not any(key.endswith(("lora_A", "lora_B")) for key in merged)
    plain = plain_model()
    plain.load_state_dict(merged)  # strict: exactly a plain model's keys
    x = torch.randn(9, IN)
    with torch.no_grad():
        assert rel_error(plain(x), model(x)) < 1e-6
    after = snapshot(model, optimizer, cascade)
    for one, two in zip(before[0].values(), after[0].values(), strict=True):
        assert torch.equal(one, two)
    assert before[2]["cascade_index"] == after[2]["cascade_index"]

    # The run continues as if merged_state_dict() had not been called.
    twin, twin_optimizer, twin_cascade = lorasc_run(noise_mode="off")
    train(twin, twin_optimizer, twin_cascade, 4)
    train(model, optimizer, cascade, 5, seed=2)
    train(twin, twin_optimizer, twin_cascade, 5, seed=2)
    for key, value in twin.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize(
    "dtype, weight_format, settings",
    [
        (torch.float32, None, {"noise_lambda": 0.2, "slow_rate": 0.5}),
        (torch.bfloat16, None, {"noise_lambda": 0.2}),
        (torch.float32, "fp8_e4m3", {"noise_lambda": 0.1}),
        (torch.float32, None, {"noise_lambda": 0.2, "noise_mode": "fused"}),
    ],
    ids=["fp32-inplace-slow", "bf16-inplace", "fp8-inplace", "fp32-fused"],
)
def test_it_is_what_finalize_returns_bit_for_bit(dtype, weight_format, settings):
    model, optimizer, cascade = lorasc_run(dtype, weight_format, train_head=True, **settings)
    train(model, optimizer, cascade, 5)
    merged = cascade.merged_state_dict(device="cpu")
    finalized = cascade.finalize().state_dict()
    assert list(merged) == list(finalized)
    for key, value in finalized.items():
        assert merged[key].dtype == value.dtype and torch.equal(merged[key], value), key


def test_after_finalize_it_is_refused():
    model, optimizer, cascade = lorasc_run(noise_mode="off")
    cascade.finalize()
    with pytest.raises(RuntimeError, match="after finalize"):
        cascade.merged_state_dict()


def test_a_hugging_face_model_saves_and_loads_as_a_plain_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    inject_lorasc(model, LoRASCConfig(r=2, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    cascade = Cascade(model, optimizer, steps_per_cascade=2, noise_mode="off")
    ids = torch.randint(0, 32, (4, 8))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        cascade.step()
    model.save_pretrained(tmp_path, state_dict=cascade.merged_state_dict())
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert rel_error(plain(input_ids=ids).logits, model(input_ids=ids).logits) < 1e-5


class TiedHead(nn.Module):
    """An embedding and an output head sharing one weight (vocab 7, width 5)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.head = nn.Linear(5, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def test_every_alias_of_a_merged_weight_holds_the_merge():
    torch.manual_seed(0)
    model = TiedHead()
    inject_lorasc(model, LoRASCConfig(r=2, target_modules=["head"], backend="torch"))
    assert model.head.weight is model.emb.weight  # still tied
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    cascade = Cascade(model, optimizer, steps_per_cascade=2, noise_lambda=0.1)
    ids = torch.randint(0, 7, (4, 3))
    for _ in range(3):
        model(ids).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        cascade.step()
    # copies: the tensors it does not merge are the model's own, which finalize() changes
    merged = {key: value.clone() for key, value in cascade.merged_state_dict().items()}
    final = cascade.finalize().state_dict()
    assert list(merged) == list(final)
    assert torch.equal(final["emb.weight"], final["head.weight"])
    for key, value in final.items():
        assert torch.equal(merged[key], value), key


@pytest.mark.parametrize(
    "device, error, match",
    [
        (3.5, TypeError, "device must be a torch.device, a str or an int, got float"),
        (torch.float16, TypeError, "got dtype"),
        ("nowhere", ValueError, "device 'nowhere' is not a device"),
    ],
    ids=["float", "dtype", "bad-name"],
)
def test_merged_state_dict_refuses_a_bad_device(device, error, match):
    model, optimizer, cascade = lorasc_run()
    with pytest.raises(error, match=match):
        cascade.merged_state_dict(device=device)


def test_with_a_device_each_merged_weight_leaves_the_model_device_at_once(monkeypatch):
    """merged_state_dict(device=...) moves each layer's merged weight as soon as it is made:
    when the next layer is merged, no earlier merged weight is alive where W lives."""
    import weakref

    from lorasc_kernels.cascade import export as cascade_export

    model, optimizer, cascade = lorasc_run()
    train(model, optimizer, cascade, 2)
    made, alive_at_each_merge = [], []
    final_weight = cascade_export.final_weight

    def watched(*args):
        alive_at_each_merge.append(sum(ref() is not None for ref in made))
        weight = final_weight(*args)
        made.append(weakref.ref(weight))
        return weight

    monkeypatch.setattr(cascade_export, "final_weight", watched)
    state = cascade.merged_state_dict(device="meta")
    assert alive_at_each_merge == [0, 0]
    assert all(value.device.type == "meta" for value in state.values())
