"""export_peft_adapter: the whole run as one PEFT LoRA adapter that PEFT loads and serves."""

import copy
import json

import pytest
import torch
from torch import nn

from lorasc_kernels import Cascade, LoRASCConfig, LoRASCLinear, inject_lorasc
from lorasc_kernels.inject import lorasc_layers
from tests.helpers import TOLERANCE, rel_error

peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

IN, HIDDEN, OUT = 13, 11, 7


def base_model(dtype):
    return nn.Sequential(
        nn.Linear(IN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, OUT),
    ).to(dtype)


def train_and_finalize(model, rounding, cascades=3, steps_per_cascade=2, **cascade_kwargs):
    """A LoRASC run with kept history; returns the cascade after finalize."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    cascade = Cascade(
        model,
        optimizer,
        steps_per_cascade=steps_per_cascade,
        keep_history=True,
        rounding=rounding,
        **cascade_kwargs,
    )
    x = torch.randn(16, IN).to(next(model.parameters()).dtype)
    for _ in range(cascades * steps_per_cascade + 1):  # the last step is merged by finalize
        model(x).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        cascade.step()
    cascade.finalize()
    return cascade


@pytest.mark.parametrize(
    "dtype, rounding",
    [
        (torch.float32, "nearest"),
        (torch.bfloat16, "stochastic"),
    ],
    ids=["fp32-nearest", "bf16-stochastic"],
)
def test_peft_reproduces_the_finalized_model(tmp_path, dtype, rounding):
    model = base_model(dtype)
    original = copy.deepcopy(model)
    inject_lorasc(
        model, LoRASCConfig(r=2, lora_alpha=4, target_modules=["0", "4"], lora_dtype=torch.float32)
    )
    cascade = train_and_finalize(model, rounding)
    merges = 3 + 1
    folder = cascade.export_peft_adapter(tmp_path / "adapter")

    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == config["lora_alpha"] == 2 * merges
    assert config["target_modules"] == "^(?:0|4)$"
    tensors = safetensors_torch.load_file(folder / "adapter_model.safetensors")
    assert set(tensors) == {
        f"base_model.model.{n}.lora_{m}.weight" for n in ("0", "4") for m in ("A", "B")
    }
    assert tensors["base_model.model.0.lora_A.weight"].shape == (2 * merges, IN)
    assert tensors["base_model.model.4.lora_B.weight"].shape == (OUT, 2 * merges)

    x = torch.randn(9, IN).to(dtype)
    with torch.no_grad():
        untouched = original(x)
        served = peft.PeftModel.from_pretrained(original, folder).eval()
        expected, actual = model(x), served(x)
    # fp32: the finalized weights and PEFT's W₀ + ΣcBA differ by float32 rounding only.
    tolerance = 1e-6 if dtype == torch.float32 else TOLERANCE[dtype]
    assert rel_error(actual, expected) < tolerance
    assert rel_error(untouched, expected) > 10 * tolerance  # the run did change the model


def test_layer_names_are_those_inside_a_data_parallel_wrapper(tmp_path):
    model = base_model(torch.float32)
    original = copy.deepcopy(model)
    inject_lorasc(model, LoRASCConfig(r=2, target_modules=["2"]))
    cascade = train_and_finalize(nn.DataParallel(model), "nearest", cascades=1)
    assert type(model[2]) is nn.Linear
    folder = cascade.export_peft_adapter(tmp_path / "adapter")
    assert json.loads((folder / "adapter_config.json").read_text())["target_modules"] == "^(?:2)$"
    x = torch.randn(9, IN)
    with torch.no_grad():
        served = peft.PeftModel.from_pretrained(original, folder).eval()
        assert rel_error(served(x), model(x)) < 1e-6


def test_layers_of_different_ranks_get_rank_patterns(tmp_path):
    model = base_model(torch.float32)
    original = copy.deepcopy(model)
    inject_lorasc(model, LoRASCConfig(r=1, lora_alpha=2, target_modules=["0"]))
    inject_lorasc(model, LoRASCConfig(r=3, lora_alpha=2, target_modules=["2", "4"]))
    for layer in lorasc_layers(model).values():  # the second injection froze the first LoRA
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    cascade = train_and_finalize(model, "nearest", cascades=1, noise_mode="off")
    folder = cascade.export_peft_adapter(tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["rank_pattern"] == {"^0": 2}
    assert config["alpha_pattern"] == {"^0": 2}
    served = peft.PeftModel.from_pretrained(original, folder).eval()
    x = torch.randn(9, IN)
    with torch.no_grad():
        assert rel_error(served(x), model(x)) < 1e-6


def test_peft_serves_the_run_on_a_hugging_face_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    original = copy.deepcopy(model)
    inject_lorasc(model, LoRASCConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    cascade = Cascade(model, optimizer, steps_per_cascade=2, keep_history=True, rounding="nearest")
    ids = torch.randint(0, 32, (4, 8))
    for _ in range(5):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        cascade.step()
    cascade.finalize()
    folder = cascade.export_peft_adapter(tmp_path / "adapter")
    with torch.no_grad():
        served = peft.PeftModel.from_pretrained(original, folder).eval()
        assert rel_error(served(input_ids=ids).logits, model(input_ids=ids).logits) < 1e-6


def test_export_needs_history_and_a_merge(tmp_path):
    def fresh_run(**settings):
        model = base_model(torch.float32)
        inject_lorasc(model, LoRASCConfig(r=2))
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        return Cascade(model, optimizer, **settings)

    with pytest.raises(RuntimeError, match="keep_history"):
        fresh_run().export_peft_adapter(tmp_path)
    with pytest.raises(RuntimeError, match="nothing to export"):
        fresh_run(keep_history=True).export_peft_adapter(tmp_path)


def test_names_are_anchored_so_peft_adapts_exactly_the_exported_layers(tmp_path):
    """A layer named ``1`` next to a module ``0.1``: PEFT's suffix match would take both."""
    model = nn.Sequential(nn.Sequential(nn.Linear(IN, IN), nn.Linear(IN, IN)), nn.Linear(IN, OUT))
    original = copy.deepcopy(model)
    inject_lorasc(model, LoRASCConfig(r=2, target_modules="1"))  # a regex: the path "1" only
    cascade = train_and_finalize(model, "nearest", cascades=1)
    folder = cascade.export_peft_adapter(tmp_path / "adapter")
    served = peft.PeftModel.from_pretrained(original, folder).eval()
    adapted = {
        name.removeprefix("base_model.model.").removesuffix(".lora_A")
        for name, _ in served.named_modules()
        if name.endswith(".lora_A")
    }
    assert adapted == {"1"}
    x = torch.randn(9, IN)
    with torch.no_grad():
        assert rel_error(served(x), model(x)) < 1e-6


def test_a_bare_layer_model_is_refused_before_anything_is_written(tmp_path):
    layer = LoRASCLinear(IN, OUT, r=2)
    optimizer = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1)
    cascade = Cascade(layer, optimizer, keep_history=True, noise_mode="off")
    with torch.no_grad():
        layer.lora_B.normal_()
    cascade.finalize()
    with pytest.raises(ValueError, match="wrap it"):
        cascade.export_peft_adapter(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_a_rank_k_export_is_the_best_rank_k_adapter_and_reports_its_error(tmp_path, caplog):
    model = base_model(torch.float32)
    original = copy.deepcopy(model)
    inject_lorasc(model, LoRASCConfig(r=2, lora_alpha=4, target_modules=["0", "4"]))
    cascade = train_and_finalize(model, "nearest", cascades=4)  # rank 2·5 = 10 per layer
    with caplog.at_level("INFO", logger="lorasc_kernels"):
        folder = cascade.export_peft_adapter(tmp_path / "adapter", max_rank=3)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 3
    tensors = safetensors_torch.load_file(folder / "adapter_model.safetensors")
    assert tensors["base_model.model.0.lora_A.weight"].shape == (3, IN)
    assert tensors["base_model.model.4.lora_B.weight"].shape == (OUT, 3)
    errors = cascade.export_errors
    assert set(errors) == {"0", "4"}
    for name, pairs in cascade.history.items():
        delta = sum(b.double() @ a.double() for b, a in pairs)
        s = torch.linalg.svdvals(delta)
        assert errors[name] == pytest.approx(float(s[3:].norm() / s.norm()), rel=1e-9)
        assert f"layer '{name}' truncated to rank 3" in caplog.text
    served = peft.PeftModel.from_pretrained(copy.deepcopy(original), folder).eval()
    exact = cascade.export_peft_adapter(tmp_path / "exact")  # max_rank=None: as before
    assert json.loads((exact / "adapter_config.json").read_text())["r"] == 10
    x = torch.randn(9, IN)
    with torch.no_grad():
        hidden_served = served.base_model.model[0](x)
        hidden_exact = model[0](x)
        delta = sum(b @ a for b, a in cascade.history["0"])
        hidden_best = x @ (original[0].weight + _best_rank(delta, 3)).T + original[0].bias
    assert rel_error(hidden_served, hidden_best) < 1e-5
    assert rel_error(hidden_served, hidden_exact) > 1e-4  # rank 3 < 10: something is cut


def _best_rank(matrix, k):
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :k] * s[:k] @ vh[:k]).float()


def test_a_rank_above_the_history_is_exact_and_refuses_bad_ranks(tmp_path):
    model = base_model(torch.float32)
    inject_lorasc(model, LoRASCConfig(r=2, target_modules=["2"]))
    cascade = train_and_finalize(model, "nearest", cascades=1)
    cascade.export_peft_adapter(tmp_path / "adapter", max_rank=50)
    assert cascade.export_errors == {"2": 0.0}
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4  # the rank of the history (2 merges of rank 2)
    with pytest.raises(ValueError, match="max_rank"):
        cascade.export_peft_adapter(tmp_path / "bad", max_rank=0)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("compute", [None, "fp8"], ids=["fp8-storage", "fp8-compute"])
def test_an_fp8_run_exports_the_updates_it_merged(tmp_path, compute):
    """On e4m3 base weights, in both modes, the adapter served by PEFT on the dequantized
    starting weights gives the finalized model up to the merges' stochastic rounding into
    the codes (four merges of up to one e4m3 step each: ~12 % here), far from the
    untrained model (~200 %)."""
    from lorasc_kernels.formats.quantize import quantize

    model = base_model(torch.float32)
    original = copy.deepcopy(model)
    with torch.no_grad():
        for index in (0, 4):
            weight = original[index].weight
            weight.copy_(quantize(weight, torch.float8_e4m3fn).dequantize(torch.float32))
    config = LoRASCConfig(
        r=2, lora_alpha=4, target_modules=["0", "4"], weight_format="fp8_e4m3", compute=compute
    )
    inject_lorasc(model, config)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    cascade = Cascade(
        model, optimizer, steps_per_cascade=2, keep_history=True, rounding="stochastic"
    )
    x = torch.randn(16, IN)
    for _ in range(7):  # three cascades, and the last step merged by finalize
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        cascade.step()
    cascade.finalize()
    folder = cascade.export_peft_adapter(tmp_path / "adapter")
    x = torch.randn(9, IN)
    with torch.no_grad():
        untouched = original(x)
        served = peft.PeftModel.from_pretrained(original, folder).eval()
        expected, actual = model(x), served(x)
    assert rel_error(actual, expected) < 0.25
    assert rel_error(untouched, expected) > 1.0
