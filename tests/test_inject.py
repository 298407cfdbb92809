"""inject_lorasc on a small transformer-like model: matching, freezing, outputs, state_dict."""

import pytest
import torch
from torch import nn

from lorasc_kernels import LoRASCConfig, LoRASCLinear, inject_lorasc


class Attention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.o_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.o_proj(weights @ v)


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def tiny_transformer(dim=16, depth=2):
    return nn.Sequential(*[Block(dim) for _ in range(depth)], nn.Linear(dim, 3))


def test_suffix_names_match_and_freeze_everything_else():
    model = tiny_transformer()
    x = torch.randn(2, 5, 16)
    before = model(x)
    layers = inject_lorasc(model, LoRASCConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert sorted(layers) == ["0.attn.q_proj", "0.attn.v_proj", "1.attn.q_proj", "1.attn.v_proj"]
    assert all(isinstance(m, LoRASCLinear) for m in layers.values())
    assert model.get_submodule("0.attn.q_proj") is layers["0.attn.q_proj"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert torch.allclose(model(x), before, atol=1e-6)  # B = 0 at init


def test_regex_and_all_linear():
    model = tiny_transformer()
    layers = inject_lorasc(model, LoRASCConfig(r=2, target_modules=r".*mlp\.\d+"))
    assert sorted(layers) == ["0.mlp.0", "0.mlp.2", "1.mlp.0", "1.mlp.2"]
    every = inject_lorasc(tiny_transformer(), LoRASCConfig(r=2))
    assert len(every) == 2 * 6 + 1


def test_training_changes_only_lora_and_state_dict_round_trips():
    torch.manual_seed(1)
    model = tiny_transformer()
    inject_lorasc(model, LoRASCConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, target = torch.randn(4, 5, 16), torch.randn(4, 5, 3)
    losses = []
    for _ in range(20):
        loss = nn.functional.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    clone = tiny_transformer()
    inject_lorasc(clone, LoRASCConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]))
    clone.load_state_dict(model.state_dict())
    assert torch.equal(clone(x), model(x))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"target_modules": []}, ValueError, "empty"),
        ({"target_modules": ""}, ValueError, "empty"),
        ({"target_modules": "("}, ValueError, "regex"),
        ({"target_modules": 3}, TypeError, "target_modules"),
        ({"target_modules": [""]}, TypeError, "target_modules"),
        ({"r": 0}, ValueError, "r must be"),
        ({"lora_dropout": 2.0}, ValueError, "lora_dropout"),
    ],
)
def test_bad_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoRASCConfig(**kwargs)


def test_nothing_matches_lists_linear_layers():
    with pytest.raises(ValueError, match="matched no nn.Linear.*q_proj"):
        inject_lorasc(tiny_transformer(), LoRASCConfig(target_modules=["query"]))


def test_rank_too_large_for_a_layer_leaves_model_unchanged():
    model = tiny_transformer()
    with pytest.raises(ValueError, match="r=8 exceeds"):
        inject_lorasc(model, LoRASCConfig(r=8, target_modules=["2"]))  # the 16→3 head
    assert type(model[2]) is nn.Linear and model[2].weight.requires_grad


def test_bad_arguments_types():
    with pytest.raises(TypeError, match="model"):
        inject_lorasc("model", LoRASCConfig())
    with pytest.raises(TypeError, match="config"):
        inject_lorasc(tiny_transformer(), {"r": 4})


def test_bad_lora_dtype_is_refused_before_the_model_changes():
    with pytest.raises(TypeError, match="lora_dtype"):
        LoRASCConfig(r=2, lora_dtype=torch.int32)
    with pytest.raises(TypeError, match="lora_dtype"):
        LoRASCConfig(r=2, lora_dtype="float32")


class WithHead(nn.Module):
    """A model whose output layer PEFT's "all-linear" leaves alone."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 5)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, x):
        return self.lm_head(self.body(x))


def test_all_linear_skips_the_output_layer():
    model = WithHead()
    layers = inject_lorasc(model, LoRASCConfig(r=2))
    assert list(layers) == ["body"] and type(model.lm_head) is nn.Linear
    named = inject_lorasc(WithHead(), LoRASCConfig(r=2, target_modules=["lm_head"]))
    assert list(named) == ["lm_head"]


def test_a_list_entry_matching_no_linear_layer_warns(caplog):
    with caplog.at_level("WARNING", logger="lorasc_kernels"):
        layers = inject_lorasc(
            tiny_transformer(), LoRASCConfig(r=2, target_modules=["q_proj", "qproj"])
        )
    assert len(layers) == 2
    assert "target_modules entry 'qproj' matched no nn.Linear" in caplog.text
    assert "'q_proj'" not in caplog.text


def test_a_model_injected_already_says_so_and_keeps_its_fast_loras_trainable(caplog):
    model = tiny_transformer()
    first = inject_lorasc(model, LoRASCConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(
        ValueError,
        match=r"LoRASCLinear already \(inject_lorasc ran on this "
        r"model\): 0.attn.q_proj, 1.attn.q_proj",
    ):
        inject_lorasc(model, LoRASCConfig(r=2, target_modules=["q_proj"]))
    with caplog.at_level("WARNING", logger="lorasc_kernels"):
        second = inject_lorasc(model, LoRASCConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert sorted(second) == ["0.attn.v_proj", "1.attn.v_proj"]
    assert "2 targeted layers are LoRASCLinear already" in caplog.text
    assert "matched no nn.Linear" not in caplog.text  # q_proj matched (LoRASC) layers
    assert all(
        layer.lora_A.requires_grad and layer.lora_B.requires_grad
        for layer in (*first.values(), *second.values())
    )
    assert model.get_submodule("0.attn.q_proj") is first["0.attn.q_proj"]


def test_bias_all_trains_the_adapted_layers_biases_too():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    inject_lorasc(model, LoRASCConfig(r=1, bias="all"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.bias", "0.lora_A", "0.lora_B", "2.bias", "2.lora_A", "2.lora_B"}
    x = torch.randn(3, 4)
    model(x).sum().backward()
    assert model[0].bias.grad is not None and model[2].bias.grad is not None


def test_a_trainable_name_on_an_adapted_layer_is_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"trainable names match adapted layers \['0'\]"):
        inject_lorasc(model, LoRASCConfig(r=1, target_modules=["0"], trainable=["0"]))
    assert all(p.requires_grad for p in model.parameters())  # nothing changed
    assert type(model[0]) is nn.Linear
