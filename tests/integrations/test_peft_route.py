"""PEFT's way in: LoraConfig to LoRASCConfig, PEFT models driven by a Cascade, PEFT layers on
the fused kernel, and TRL's SFTTrainer with LoRASCCallback."""

import copy

import pytest
import torch
from torch import nn

from lorasc_kernels import Cascade, LoRASCConfig, LoRASCLinear, inject_lorasc, lorasc_linear
from lorasc_kernels.integrations.peft import PeftLoraLayer, peft_lora_layers, use_fused_kernels
from tests.helpers import trainer_args_and_state

peft = pytest.importorskip("peft")
IN, HIDDEN, OUT = 12, 10, 4


def base_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(IN, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, OUT),
    )


def lora_config(**kwargs):
    return peft.LoraConfig(**{"r": 2, "lora_alpha": 4, "target_modules": ["0", "2"], **kwargs})


def adam(model):
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)


def train(model, optimizer, cascade, steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, IN, generator=generator)
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        cascade.step()


# -- LoraConfig → LoRASCConfig ---------------------------------------------------------------


def test_from_peft_takes_what_lora_config_says():
    config = LoRASCConfig.from_peft(
        lora_config(
            lora_dropout=0.1,
            modules_to_save=["4"],
            bias="lora_only",
            use_rslora=True,
            task_type="CAUSAL_LM",
        )
    )
    assert (config.r, config.lora_dropout, config.target_modules) == (2, 0.1, ["0", "2"])
    assert config.lora_alpha == pytest.approx(4 * 2**0.5)  # scale alpha/√r, as rsLoRA's
    assert (config.trainable, config.bias) == (["4"], "lora_only")
    assert (
        LoRASCConfig.from_peft(lora_config(target_modules="all-linear")).target_modules
        == "all-linear"
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"use_dora": True}, "LoraConfig.use_dora=True has no LoRASC counterpart"),
        ({"rank_pattern": {"0": 4}}, "LoraConfig.rank_pattern"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
        ({"target_modules": None}, "target_modules is None"),
        ({"layers_to_transform": [0]}, "LoraConfig.layers_to_transform"),
    ],
    ids=["dora", "rank-pattern", "pissa", "no-targets", "layers"],
)
def test_from_peft_refuses_what_it_cannot_honour_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRASCConfig.from_peft(lora_config(**kwargs))


def test_inject_takes_a_lora_config_with_modules_to_save_and_bias():
    model = base_model()
    layers = inject_lorasc(model, lora_config(modules_to_save=["4"], bias="lora_only"))
    assert list(layers) == ["0", "2"] and all(isinstance(m, LoRASCLinear) for m in layers.values())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "0.lora_A",
        "0.lora_B",
        "0.bias",
        "2.lora_A",
        "2.lora_B",
        "2.bias",
        "4.weight",
        "4.bias",
    }


def test_inject_refuses_a_trainable_name_that_matches_nothing():
    model = base_model()
    with pytest.raises(ValueError, match=r"trainable names \['head'\] match no module"):
        inject_lorasc(model, LoRASCConfig(r=2, target_modules=["0"], trainable=["head"]))
    assert all(p.requires_grad for p in model.parameters())  # nothing changed


def test_inject_refuses_a_peft_model_naming_the_route():
    model = peft.get_peft_model(base_model(), lora_config())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"PEFT LoRA layers .*Cascade\(model, optimizer\)"):
        inject_lorasc(model, LoRASCConfig(r=2))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- a PEFT model under a Cascade ------------------------------------------------------------


def test_a_cascade_on_a_peft_model_equals_the_native_route_bit_for_bit():
    """Same start (the PEFT adapters' A copied into the LoRASC layers), same data: with the
    fused kernels both routes compute the same bits, boundaries included."""
    peft_model = peft.get_peft_model(base_model(), lora_config())
    use_fused_kernels(peft_model)
    native = base_model()
    inject_lorasc(native, LoRASCConfig.from_peft(lora_config()))
    views = peft_lora_layers(peft_model)
    with torch.no_grad():
        for view, name in zip(views.values(), ["0", "2"], strict=True):
            native.get_submodule(name).lora_A.copy_(view.lora_A)
    cascades = []
    for model in (peft_model, native):
        optimizer = adam(model)
        cascade = Cascade(model, optimizer, steps_per_cascade=3, seed=5)
        train(model, optimizer, cascade, 7)
        cascades.append(cascade)
    assert cascades[0].cascade_index == cascades[1].cascade_index == 2
    for view, name in zip(views.values(), ["0", "2"], strict=True):
        layer = native.get_submodule(name)
        assert torch.equal(view.weight, layer.weight)
        assert torch.equal(view.lora_A, layer.lora_A) and torch.equal(view.lora_B, layer.lora_B)
    x = torch.randn(5, IN)
    assert torch.equal(peft_model(x), native(x))


def test_a_boundary_merges_into_the_base_weight_and_resets_the_adapter_as_peft_does():
    model = peft.get_peft_model(base_model(), lora_config())
    optimizer = adam(model)
    cascade = Cascade(model, optimizer, steps_per_cascade=2, seed=2)
    view = peft_lora_layers(model)["base_model.model.0"]
    w0 = view.weight.detach().clone()
    train(model, optimizer, cascade, 1)
    model(torch.randn(8, IN)).pow(2).mean().backward()
    optimizer.step()
    update = view.scaling * (view.lora_B @ view.lora_A).detach()
    assert update.abs().max() > 0
    cascade.step()  # the boundary
    assert cascade.cascade_index == 1
    torch.testing.assert_close(view.weight.detach() - w0, update, rtol=1e-5, atol=1e-7)
    assert torch.equal(view.lora_B, torch.zeros_like(view.lora_B))  # PEFT's B = 0
    assert view.lora_A not in optimizer.state and view.lora_B not in optimizer.state


def test_finalize_puts_the_base_linears_back_with_every_merge():
    model = peft.get_peft_model(base_model(), lora_config())
    optimizer = adam(model)
    cascade = Cascade(model, optimizer, steps_per_cascade=2)
    train(model, optimizer, cascade, 3)
    x = torch.randn(6, IN)
    running = model(x).detach()
    final = cascade.finalize()
    assert final is model.get_base_model()  # the plain model, not the PEFT wrapper
    assert type(final[0]) is nn.Linear
    assert not peft_lora_layers(model)
    torch.testing.assert_close(final(x), running, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["fused"])
def test_fused_noise_on_a_peft_model_is_refused(mode):
    model = peft.get_peft_model(base_model(), lora_config())
    with pytest.raises(ValueError, match="noise_mode='fused' is not supported on PEFT layers"):
        Cascade(model, adam(model), noise_lambda=0.1, noise_mode=mode)


def test_peft_layers_lorasc_cannot_drive_are_refused_by_name():
    model = peft.get_peft_model(base_model(), lora_config())
    model.base_model.model[2].merge()
    with pytest.raises(ValueError, match=r"PEFT layer 'base_model.model.2' has its adapter merged"):
        Cascade(model, adam(model))
    dora = peft.get_peft_model(base_model(), lora_config(use_dora=True))
    with pytest.raises(ValueError, match="uses DoRA"):
        Cascade(dora, adam(dora))


def test_export_of_a_peft_route_run_says_to_save_the_model(tmp_path):
    model = peft.get_peft_model(base_model(), lora_config())
    optimizer = adam(model)
    cascade = Cascade(model, optimizer, steps_per_cascade=1, keep_history=True)
    train(model, optimizer, cascade, 1)
    with pytest.raises(RuntimeError, match="finalize\\(\\) and save the model"):
        cascade.export_peft_adapter(tmp_path)


# -- PEFT layers on the fused kernel ---------------------------------------------------------


def test_fused_peft_layers_equal_a_lorasc_layer_bit_for_bit():
    model = peft.get_peft_model(base_model(), lora_config(lora_dropout=0.25))
    view = use_fused_kernels(model)["base_model.model.0"]
    assert isinstance(view, PeftLoraLayer)
    with torch.no_grad():
        view.lora_B.normal_()
    x = torch.randn(7, IN, requires_grad=True)
    torch.manual_seed(9)  # the dropout seed is drawn from torch's generator, as LoRASCLinear's
    y = view.module(x)
    y.square().sum().backward()
    grads = (x.grad.clone(), view.lora_A.grad.clone(), view.lora_B.grad.clone())
    x.grad = None
    base = view.module.base_layer
    lora_A = view.lora_A.detach().clone().requires_grad_(True)
    lora_B = view.lora_B.detach().clone().requires_grad_(True)
    torch.manual_seed(9)
    expected = lorasc_linear(
        x, base.weight, base.bias, lora_A, lora_B, view.scaling, dropout_p=0.25
    )
    expected.square().sum().backward()
    assert torch.equal(y, expected)
    for got, want in zip(grads, (x.grad, lora_A.grad, lora_B.grad), strict=True):
        assert torch.equal(got, want)


def test_fused_peft_layers_follow_disabled_adapters():
    model = peft.get_peft_model(base_model(), lora_config())
    use_fused_kernels(model)
    with torch.no_grad():
        for view in peft_lora_layers(model).values():
            view.lora_B.normal_()
    x = torch.randn(3, IN)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), model.base_model.model(x))
        assert torch.equal(model(x), base_model()(x))
    assert not torch.equal(model(x), base_model()(x))


# -- TRL -------------------------------------------------------------------------------------


def tiny_llama():
    """A one-layer Llama, 16 tokenized sequences and a word-level tokenizer, all offline."""
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    tokenizers = pytest.importorskip("tokenizers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    data = datasets.Dataset.from_list(
        [{"input_ids": torch.randint(0, 64, (12,)).tolist()} for _ in range(16)]
    )
    vocabulary = {f"t{i}": i for i in range(64)}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocabulary, "t0")),
        pad_token="t0",
        eos_token="t1",
    )
    return model, data, tokenizer


def sft_trainer(output_dir, callback_settings=None, target_modules=("q_proj", "v_proj"), **args):
    """An SFTTrainer of :func:`tiny_llama` with a LoRASCCallback (``callback_settings``,
    by default a cascade every 2 steps with noise), its callback and a batch of ids;
    ``args`` override the SFTConfig's (5 steps, no saves)."""
    trl = pytest.importorskip("trl")
    from lorasc_kernels import LoRASCCallback

    model, data, tokenizer = tiny_llama()
    callback = LoRASCCallback(
        **(callback_settings or {"steps_per_cascade": 2, "seed": 1, "noise_lambda": 0.1})
    )
    config = {
        "output_dir": str(output_dir),
        "max_steps": 5,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "bf16": False,
        **args,
    }
    trainer = trl.SFTTrainer(
        model=model,
        train_dataset=data,
        callbacks=[callback],
        processing_class=tokenizer,
        peft_config=peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=list(target_modules), task_type="CAUSAL_LM"
        ),
        args=trl.SFTConfig(**config),
    )
    return trainer, callback, torch.tensor(data["input_ids"][:4])


def test_sft_trainer_with_a_peft_config_trains_with_cascades(tmp_path):
    trainer, callback, _ = sft_trainer(tmp_path, {"steps_per_cascade": 2, "seed": 1})
    q_proj = trainer.model.base_model.model.model.layers[0].self_attn.q_proj
    w0 = q_proj.base_layer.weight.detach().clone()
    trainer.train()
    cascade = callback.cascade
    assert (cascade.cascade_index, cascade.steps_in_cascade) == (2, 1)
    assert all(isinstance(layer, PeftLoraLayer) for layer in cascade.layers.values())
    assert not torch.equal(q_proj.base_layer.weight, w0)  # merges landed in the base weight


def test_sft_trainer_resumes_a_peft_run_bit_exactly(tmp_path):
    """The merged base weights travel with the checkpoint (beside the Cascade's state and in
    the adapter file) and are put back on resume: the run ends where the whole one does."""

    def run(output_dir, resume=None):
        trainer, _, _ = sft_trainer(
            output_dir,
            target_modules=("q_proj",),
            max_steps=6,
            save_strategy="steps",
            save_steps=3,
            seed=0,
            data_seed=0,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer.model.state_dict()

    whole = run(tmp_path / "whole")
    resumed = run(tmp_path / "whole", resume=str(tmp_path / "whole" / "checkpoint-3"))
    assert set(whole) == set(resumed)
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key


def test_merged_state_dict_of_a_peft_run_is_the_finalized_model():
    model = peft.get_peft_model(base_model(), lora_config())
    optimizer = adam(model)
    cascade = Cascade(model, optimizer, steps_per_cascade=2)
    train(model, optimizer, cascade, 3)
    merged = cascade.merged_state_dict()
    final = cascade.finalize()
    assert list(merged) == list(final.state_dict())
    assert all(torch.equal(merged[k], v) for k, v in final.state_dict().items())


# -- saves that keep the training (a tiny Llama) ---------------------------------------------


def llama_lora_config():
    return peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )


def trained_llama(steps=3):
    """A PEFT Llama a Cascade trained ``steps`` steps (one boundary, then a trained fast
    LoRA), its Cascade and a batch; the base weights carry in-place noise."""
    model, data, _ = tiny_llama()
    peft_model = peft.get_peft_model(model, llama_lora_config())
    optimizer = adam(peft_model)
    cascade = Cascade(peft_model, optimizer, steps_per_cascade=2, noise_lambda=0.1, seed=3)
    ids = torch.tensor(data["input_ids"][:4])
    for _ in range(steps):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        cascade.step()
    return peft_model.eval(), cascade, ids


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def untouched_llama():
    return tiny_llama()[0]


def test_a_mid_run_save_pretrained_reloads_as_the_trained_model(tmp_path):
    peft_model, cascade, ids = trained_llama()
    peft_model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(untouched_llama(), tmp_path)
    assert not torch.equal(logits(reloaded, ids), logits(untouched_llama(), ids))
    assert torch.equal(logits(reloaded, ids), logits(peft_model, ids))
    peft_model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    reloaded = peft.PeftModel.from_pretrained(untouched_llama(), tmp_path / "bin")
    assert torch.equal(logits(reloaded, ids), logits(peft_model, ids))


def test_the_finalized_model_saves_and_reloads_as_a_plain_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft_model, cascade, ids = trained_llama()
    final = cascade.finalize()
    assert isinstance(final, transformers.LlamaForCausalLM)
    assert not peft_lora_layers(final)
    final.save_pretrained(tmp_path / "final")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert torch.equal(logits(reloaded, ids), logits(final, ids))
    # the wrapper's own save, after finalize(), reloads as the finalized model too
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(untouched_llama(), tmp_path / "adapter")
    assert torch.equal(logits(reloaded, ids), logits(final, ids))


def test_merged_state_dict_of_a_peft_model_loads_into_a_fresh_plain_model():
    transformers = pytest.importorskip("transformers")
    peft_model, cascade, ids = trained_llama()
    merged = cascade.merged_state_dict()
    assert not any(key.startswith("base_model.") or "lora_" in key for key in merged)
    fresh = transformers.LlamaForCausalLM(peft_model.get_base_model().config)
    fresh.load_state_dict(merged)  # strict: the plain model's keys, every one
    final = cascade.finalize()
    assert torch.equal(logits(fresh, ids), logits(final, ids))


def test_an_adapter_save_of_a_plain_state_dict_is_refused_naming_the_route(tmp_path):
    peft_model, cascade, _ = trained_llama()
    with pytest.raises(ValueError, match=r"get_base_model\(\)\.save_pretrained"):
        peft_model.save_pretrained(tmp_path, state_dict=cascade.merged_state_dict())
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_the_documented_save_and_reload_lines_give_the_trained_models(tmp_path, monkeypatch):
    """docs/peft.md's "Saving and reloading" block, run as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "peft.md").read_text()
    section = text.split("### Saving and reloading")[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    peft_model, cascade, ids = trained_llama()
    untouched_llama().save_pretrained(tmp_path / "base")
    now = logits(peft_model, ids)
    merged_model = copy.deepcopy(peft_model)
    monkeypatch.chdir(tmp_path)
    scope = {"peft_model": peft_model, "cascade": cascade, "base_name": str(tmp_path / "base")}
    exec(code, scope)
    assert torch.equal(logits(scope["now"], ids), now)
    final = logits(scope["model"], ids)
    assert torch.equal(logits(scope["final"], ids), final)
    assert torch.equal(logits(scope["merged"], ids), final)
    assert not torch.equal(final, logits(merged_model.get_base_model(), ids))


def test_sft_trainer_save_model_reloads_as_the_trained_model_mid_run_and_finalized(tmp_path):
    transformers = pytest.importorskip("transformers")
    trainer, callback, ids = sft_trainer(tmp_path / "out")
    trainer.train()
    trainer.model.eval()
    trained = logits(trainer.model, ids)
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = peft.PeftModel.from_pretrained(untouched_llama(), tmp_path / "saved")
    assert torch.equal(logits(reloaded, ids), trained)
    final = callback.cascade.finalize()
    trainer.save_model(str(tmp_path / "final"))  # the PEFT wrapper, finalized
    reloaded = peft.PeftModel.from_pretrained(untouched_llama(), tmp_path / "final")
    assert torch.equal(logits(reloaded, ids), logits(final, ids))
    final.save_pretrained(tmp_path / "plain")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert torch.equal(logits(plain, ids), logits(final, ids))


# -- boundaries re-check the layers they merge -----------------------------------------------


def _merge_adapter(model):
    model.merge_adapter()


def _merge_and_unload(model):
    model.merge_and_unload()


def _unload(model):
    model.unload()


def _other_adapter(model):
    model.add_adapter("other", lora_config())
    model.set_adapter("other")


@pytest.mark.parametrize("what", ["step", "merged_state_dict", "finalize"])
@pytest.mark.parametrize(
    "change, match",
    [
        (_merge_adapter, r"'base_model.model.0' has its adapter merged \(merge_adapter\(\)\)"),
        (_merge_and_unload, r"no longer holds the layer 'base_model.model.0'"),
        (_unload, r"no longer holds the layer 'base_model.model.0'"),
        (_other_adapter, r"active adapters are \['other'\], the Cascade drives 'default'"),
    ],
    ids=["merge_adapter", "merge_and_unload", "unload", "set_adapter"],
)
def test_a_changed_peft_model_is_refused_before_any_merge(change, match, what):
    model = peft.get_peft_model(base_model(), lora_config())
    optimizer = adam(model)
    cascade = Cascade(model, optimizer, steps_per_cascade=2, noise_lambda=0.1)
    train(model, optimizer, cascade, 1)  # the next step ends the cascade
    change(model)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match=match):
        getattr(cascade, what)()
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert (cascade.cascade_index, cascade.steps_in_cascade) == (0, 1)


def test_a_boundary_inside_disable_adapter_is_refused():
    model = peft.get_peft_model(base_model(), lora_config())
    optimizer = adam(model)
    cascade = Cascade(model, optimizer, steps_per_cascade=2)
    train(model, optimizer, cascade, 1)
    before = copy.deepcopy(model.state_dict())
    with model.disable_adapter():
        with pytest.raises(RuntimeError, match=r"adapters disabled \(inside disable_adapter"):
            cascade.step()
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())
    cascade.step()  # outside the context the boundary runs
    assert cascade.cascade_index == 1


def test_a_merged_adapter_is_named_at_finalize():
    model = peft.get_peft_model(base_model(), lora_config())
    cascade = Cascade(model, adam(model))
    model.merge_adapter()
    with pytest.raises(RuntimeError, match="merged"):
        cascade.finalize()


def test_a_saved_lora_config_of_another_peft_version_is_taken(tmp_path):
    config = lora_config(lora_dropout=0.1)
    config.save_pretrained(tmp_path)
    loaded = peft.LoraConfig.from_pretrained(tmp_path)
    loaded.peft_version = "0.0.1"  # written by another PEFT: bookkeeping only
    taken = LoRASCConfig.from_peft(loaded)
    assert (taken.r, taken.lora_dropout, taken.target_modules) == (2, 0.1, ["0", "2"])


def test_a_gaussian_init_is_refused_on_the_inject_route_naming_the_peft_route():
    model = base_model()
    with pytest.raises(ValueError, match=r"init_lora_weights='gaussian'.*PEFT route"):
        inject_lorasc(model, lora_config(init_lora_weights="gaussian"))
    assert not any(isinstance(m, LoRASCLinear) for m in model.modules())


def test_a_bad_cascade_state_is_refused_before_the_base_weights_are_copied(tmp_path):
    """A PEFT-route checkpoint whose lorasc_cascade.pt is bad: the resume is refused naming
    the file, and the model keeps the weights it had (peft_base.pt was not left in it)."""
    hf_callback = pytest.importorskip("lorasc_kernels.integrations.hf_callback")
    model = peft.get_peft_model(base_model(), lora_config())
    optimizer = adam(model)
    cascade = Cascade(model, optimizer, steps_per_cascade=2, noise_lambda=0.1)
    train(model, optimizer, cascade, 3)
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    state = dict(cascade.state_dict(), noise_scales=[-1.0, 0.1])
    torch.save(state, folder / hf_callback.CHECKPOINT_FILE)
    torch.save(
        {name: layer.weight.detach().clone() for name, layer in cascade.layers.items()},
        folder / "lorasc_cascade.peft_base.pt",
    )
    other = peft.get_peft_model(base_model(), lora_config())
    before = copy.deepcopy(other.state_dict())
    callback = hf_callback.LoRASCCallback(steps_per_cascade=2, noise_lambda=0.1)
    args, trainer_state = trainer_args_and_state(tmp_path, 3)
    with pytest.raises(ValueError, match=r"checkpoint-3/lorasc_cascade.pt: .*noise_scales"):
        callback.on_train_begin(args, trainer_state, None, model=other, optimizer=adam(other))
    assert all(torch.equal(value, other.state_dict()[key]) for key, value in before.items())
    assert not callback.started


def test_a_model_on_the_fused_kernel_pickles_and_loads(tmp_path):
    model = peft.get_peft_model(base_model(), lora_config())
    use_fused_kernels(model)
    x = torch.randn(3, IN)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert torch.equal(loaded(x), model(x))
