"""Cascade: boundary merges, noise, optimizer reset, schedules, finalize, resume, errors."""

import io
import logging

import pytest
import torch
from torch import nn

from lorasc_kernels import Cascade, LoRASCConfig, LoRASCLinear, inject_lorasc
from lorasc_kernels.backends.reference import lowrank_delta_fp32
from lorasc_kernels.cascade.boundary import (
    PURPOSE_INIT,
    PURPOSE_NOISE,
    PURPOSE_ROUNDING,
    cascade_seed,
)
from lorasc_kernels.inject import lorasc_layers
from lorasc_kernels.noise import noise

IN, OUT, RANK = 13, 11, 3


def one_layer(dtype=torch.float32, **layer_kwargs):
    """A single LoRASCLinear (fp32 by default) and an Adam over its fast LoRA."""
    layer = LoRASCLinear(IN, OUT, r=RANK, lora_alpha=6, dtype=dtype, **layer_kwargs)
    optimizer = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=1e-2)
    return layer, optimizer


def train_step(model, optimizer, x, target=None):
    """One optimizer step on a squared error (towards ``target``, or zero); returns the loss."""
    out = model(x)
    loss = (out - (0.0 if target is None else target)).float().pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.detach())


def fp32_scalar(value):
    return float(torch.tensor(value, dtype=torch.float32))


def scaled_noise(seed_scale, shape):
    seed, scale = seed_scale
    return fp32_scalar(scale) * noise(seed, *shape)


@pytest.mark.parametrize("noise_mode", ["off", "fused", "inplace"])
def test_boundary_adds_slow_rate_times_fast_update(noise_mode):
    layer, optimizer = one_layer()
    w0 = layer.weight.detach().clone()
    cascade = Cascade(
        layer,
        optimizer,
        steps_per_cascade=2,
        slow_rate=0.4,
        noise_mode=noise_mode,
        rounding="nearest",
    )
    scale = cascade.noise_scales[0]
    coeff = fp32_scalar(0.4 * layer.scaling)
    x = torch.randn(7, IN)
    clean = w0
    for t in range(3):
        train_step(layer, optimizer, x)
        assert not cascade.step()
        if noise_mode == "fused":
            assert torch.equal(layer.weight, clean)  # the kernels add the noise, W is untouched
        train_step(layer, optimizer, x)
        w_prev = layer.weight.detach().clone()
        delta = lowrank_delta_fp32(layer.lora_B.detach(), layer.lora_A.detach())
        assert cascade.step()
        # Hand computation in the merge's documented float32 order.
        if noise_mode == "inplace":
            noise_t = (cascade_seed(0, PURPOSE_NOISE, t, 0), scale)
            noise_next = (cascade_seed(0, PURPOSE_NOISE, t + 1, 0), scale)
            expected = w_prev - scaled_noise(noise_t, w0.shape)
            expected = (expected + coeff * delta) + scaled_noise(noise_next, w0.shape)
        else:
            expected = w_prev + coeff * delta
        assert torch.equal(layer.weight, expected)
        clean = expected
        assert cascade.cascade_index == t + 1
        assert torch.count_nonzero(layer.lora_B) == 0  # a fresh fast LoRA


def test_fused_mode_hands_fresh_noise_seeds_to_the_layers():
    model = nn.Sequential(nn.Linear(IN, OUT), nn.Linear(OUT, 5))
    inject_lorasc(model, LoRASCConfig(r=2))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    weights = [m.weight.detach().clone() for m in model]
    cascade = Cascade(model, optimizer, noise_mode="fused", noise_lambda=0.2, seed=5)
    seeds_first = [m.noise_seed for m in model]
    assert all(torch.equal(m.weight, w) for m, w in zip(model, weights, strict=True))
    assert len(set(seeds_first)) == 2 and None not in seeds_first
    for m, w in zip(model, weights, strict=True):
        assert m.noise_scale == pytest.approx(0.2 * float(w.std()))
    cascade.end_epoch()
    seeds_second = [m.noise_seed for m in model]
    assert set(seeds_first).isdisjoint(seeds_second)
    finalized = cascade.finalize()
    assert all(type(m) is nn.Linear for m in finalized)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noise_present_during_cascade_and_removed_by_finalize(dtype):
    layer, optimizer = one_layer(dtype)
    w0 = layer.weight.detach().clone()
    cascade = Cascade(
        layer,
        optimizer,
        noise_lambda=0.3,
        rounding="nearest" if dtype == torch.float32 else "stochastic",
    )
    scale = cascade.noise_scales[0]
    assert scale == pytest.approx(0.3 * float(w0.float().std()), rel=1e-6)
    ulp = torch.finfo(dtype).eps * (w0.float().abs() + scale)  # bound of one rounding
    injected = layer.weight.float() - w0.float()
    assert (injected.abs() <= scale / 2 + ulp).all()
    assert float(injected.std()) == pytest.approx(scale / 12**0.5, rel=0.2)
    cascade.end_epoch()  # a boundary with no training: the noise is swapped, nothing added
    assert float((layer.weight.float() - w0.float() - injected).abs().max()) > scale / 4
    linear = cascade.finalize()
    # Three merges (inject, swap, remove), each rounding once in W's dtype.
    assert ((linear.weight.float() - w0.float()).abs() <= 3 * ulp).all()


def test_finalize_returns_plain_linears_on_the_same_storage():
    model = nn.Sequential(nn.Linear(IN, OUT), nn.Tanh(), nn.Linear(OUT, 5, bias=False))
    inject_lorasc(model, LoRASCConfig(r=2))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    cascade = Cascade(model, optimizer, slow_rate=1.0, noise_mode="off", rounding="nearest")
    x = torch.randn(6, IN)
    train_step(model, optimizer, x)
    storages = [m.weight.data_ptr() for m in lorasc_layers(model).values()]
    expected = model(x).detach()
    finalized = cascade.finalize()
    assert finalized is model
    assert [type(m) for m in model] == [nn.Linear, nn.Tanh, nn.Linear]
    assert [model[0].weight.data_ptr(), model[2].weight.data_ptr()] == storages
    assert model[2].bias is None and model[0].bias is not None
    assert not any("lora" in key for key in model.state_dict())
    assert not lorasc_layers(model)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    assert not any(p in optimizer.state for p in optimizer.param_groups[0]["params"])
    with pytest.raises(RuntimeError, match="after finalize"):
        cascade.step()


def test_finalize_of_a_bare_layer_returns_a_linear():
    layer, optimizer = one_layer()
    linear = Cascade(layer, optimizer).finalize()
    assert type(linear) is nn.Linear
    assert linear.weight.data_ptr() == layer.weight.data_ptr()


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda groups: torch.optim.AdamW(groups, lr=1e-2),
        lambda groups: torch.optim.SGD(groups, lr=1e-2, momentum=0.9),
    ],
    ids=["adamw", "sgd-momentum"],
)
def test_boundary_drops_only_the_fast_lora_optimizer_state(make_optimizer):
    model = nn.Sequential(LoRASCLinear(IN, OUT, r=2), nn.ReLU(), nn.Linear(OUT, 4))
    lora, head = model[0], model[2]
    groups = [{"params": [lora.lora_A, lora.lora_B]}, {"params": head.parameters(), "lr": 3e-3}]
    optimizer = make_optimizer(groups)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    cascade = Cascade(model, optimizer, steps_per_cascade=2)
    x = torch.randn(5, IN)
    for _ in range(2):
        train_step(model, optimizer, x)
        scheduler.step()
        head_state = {k: v.clone() for k, v in optimizer.state[head.weight].items()}
        assert optimizer.state[lora.lora_B]
        cascade.step()
    assert lora.lora_A not in optimizer.state and lora.lora_B not in optimizer.state
    for key, value in optimizer.state[head.weight].items():
        assert torch.equal(value, head_state[key])
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2.5e-3, 7.5e-4])
    train_step(model, optimizer, x)  # the optimizer starts the new fast LoRA from scratch
    assert set(optimizer.state[lora.lora_B]) == set(optimizer.state[head.weight])


def test_training_loss_falls_with_cascades():
    torch.manual_seed(1)
    teacher = nn.Linear(IN, OUT)
    model = nn.Sequential(nn.Linear(IN, OUT))
    inject_lorasc(model, LoRASCConfig(r=4, lora_alpha=8))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    cascade = Cascade(model, optimizer, steps_per_cascade=10)
    x = torch.randn(64, IN)
    target = teacher(x).detach()
    losses = []
    for _ in range(40):
        losses.append(train_step(model, optimizer, x, target))
        cascade.step()
    assert cascade.cascade_index == 4
    model = cascade.finalize()
    final = float((model(x) - target).pow(2).mean())
    assert final < 0.5 * losses[0]
    assert losses[-1] < 0.5 * losses[0]


def test_step_and_epoch_schedules():
    layer, optimizer = one_layer()
    by_steps = Cascade(layer, optimizer, steps_per_cascade=3, noise_mode="off")
    ran = [by_steps.step() for _ in range(7)]
    assert ran == [False, False, True, False, False, True, False]
    assert not by_steps.end_epoch()
    assert (by_steps.cascade_index, by_steps.steps_in_cascade) == (2, 1)

    layer, optimizer = one_layer()
    by_epochs = Cascade(layer, optimizer, noise_mode="off")
    assert not any(by_epochs.step() for _ in range(5))
    assert by_epochs.end_epoch() and by_epochs.end_epoch()
    assert (by_epochs.cascade_index, by_epochs.steps_in_cascade) == (2, 0)


def test_derived_seeds_are_distinct_and_reproducible():
    seeds = {
        cascade_seed(7, purpose, index, layer)
        for purpose in (PURPOSE_NOISE, PURPOSE_ROUNDING, PURPOSE_INIT)
        for index in range(6)
        for layer in range(5)
    }
    assert len(seeds) == 3 * 6 * 5
    assert cascade_seed(7, PURPOSE_NOISE, 2, 3) == cascade_seed(7, PURPOSE_NOISE, 2, 3)
    assert cascade_seed(7, PURPOSE_NOISE, 2, 3) != cascade_seed(8, PURPOSE_NOISE, 2, 3)


def test_fresh_fast_lora_does_not_depend_on_torch_generator():
    """Every rank draws the same A at a boundary, whatever its torch RNG state."""
    lora_a = []
    for rng_seed in (1, 2):
        torch.manual_seed(0)
        layer, optimizer = one_layer()
        cascade = Cascade(layer, optimizer, seed=3)
        torch.manual_seed(rng_seed)
        cascade.end_epoch()
        lora_a.append(layer.lora_A.detach().clone())
    assert torch.equal(*lora_a)


def build_training():
    """The model (bf16 weights, LoRA dropout), optimizer and LR scheduler of the resume test."""
    model = nn.Sequential(nn.Linear(IN, OUT), nn.GELU(), nn.Linear(OUT, 5)).to(torch.bfloat16)
    inject_lorasc(model, LoRASCConfig(r=2, lora_dropout=0.25, lora_dtype=torch.float32))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def build_run():
    """``build_training()`` and a fresh Cascade over it."""
    model, optimizer, scheduler = build_training()
    cascade = Cascade(model, optimizer, steps_per_cascade=3, seed=11, keep_history=True)
    return model, optimizer, scheduler, cascade


def resume_run(saved, cascade_first):
    """A rebuilt run loading ``saved``: Cascade then states, or states then from_state_dict."""
    if cascade_first:
        model, optimizer, scheduler, cascade = build_run()
    else:
        model, optimizer, scheduler = build_training()
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if cascade_first:
        cascade.load_state_dict(saved["cascade"])
    else:
        cascade = Cascade.from_state_dict(model, optimizer, saved["cascade"])
    torch.set_rng_state(saved["rng"])
    return model, optimizer, scheduler, cascade


def run_steps(run, batches):
    model, optimizer, scheduler, cascade = run
    for x in batches:
        train_step(model, optimizer, x)
        scheduler.step()
        cascade.step()


def flat_history(cascade):
    """Every kept update of ``cascade``, flattened into one tensor."""
    return torch.cat(
        [t.flatten() for pairs in cascade.history.values() for pair in pairs for t in pair]
    )


@pytest.mark.parametrize("cascade_first", [True, False], ids=["load_state_dict", "from_state_dict"])
def test_resume_mid_cascade_is_bit_exact(cascade_first):
    batches = [torch.randn(4, IN).to(torch.bfloat16) for _ in range(8)]
    torch.manual_seed(100)
    uninterrupted = build_run()
    run_steps(uninterrupted, batches)

    torch.manual_seed(100)
    first = build_run()
    run_steps(first, batches[:4])  # stops one step into the second cascade
    buffer = io.BytesIO()
    model, optimizer, scheduler, cascade = first
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "cascade": cascade.state_dict(),
            "rng": torch.get_rng_state(),
        },
        buffer,
    )
    del first, model, optimizer, scheduler, cascade

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    torch.manual_seed(999)  # a new process: other RNG state, other initial weights
    resumed = resume_run(saved, cascade_first)
    run_steps(resumed, batches[4:])  # crosses the boundary after step 6

    assert resumed[3].cascade_index == uninterrupted[3].cascade_index == 2
    expected = uninterrupted[0].state_dict()
    for key, value in resumed[0].state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert all(len(pairs) == 2 for pairs in resumed[3].history.values())
    assert torch.equal(flat_history(resumed[3]), flat_history(uninterrupted[3]))


def test_load_state_dict_refuses_other_settings():
    layer, optimizer = one_layer()
    state = Cascade(layer, optimizer, slow_rate=0.5).state_dict()
    other = Cascade(*one_layer(), slow_rate=0.25, noise_mode="off")  # one Cascade per layer
    with pytest.raises(ValueError, match="settings"):
        other.load_state_dict(state)


def test_boundary_is_logged(caplog):
    layer, optimizer = one_layer()
    cascade = Cascade(layer, optimizer)
    with caplog.at_level(logging.INFO, logger="lorasc_kernels"):
        cascade.end_epoch()
    assert "merged 1 layers" in caplog.text
    assert f"{cascade.noise_scales[0]:.3g}" in caplog.text


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"slow_rate": 0.0}, ValueError, "slow_rate"),
        ({"slow_rate": 1.5}, ValueError, "slow_rate"),
        ({"noise_lambda": -0.1}, ValueError, "noise_lambda"),
        ({"noise_mode": "sometimes"}, ValueError, "noise_mode"),
        ({"steps_per_cascade": 0}, ValueError, "steps_per_cascade"),
        ({"steps_per_cascade": 2.5}, TypeError, "steps_per_cascade"),
        ({"rounding": "up"}, ValueError, "rounding"),
        ({"seed": -1}, ValueError, "seed"),
        ({"keep_history": 1}, TypeError, "keep_history"),
    ],
)
def test_bad_settings_raise(kwargs, error, match):
    layer, optimizer = one_layer()
    weight = layer.weight.detach().clone()
    with pytest.raises(error, match=match):
        Cascade(layer, optimizer, **kwargs)
    assert torch.equal(layer.weight, weight)


def test_bad_model_or_optimizer_raise():
    plain = nn.Sequential(nn.Linear(IN, OUT))
    with pytest.raises(ValueError, match="no LoRASCLinear"):
        Cascade(plain, torch.optim.SGD(plain.parameters(), lr=0.1))
    layer, _ = one_layer()
    with pytest.raises(TypeError, match="model"):
        Cascade("model", torch.optim.SGD([layer.lora_A], lr=0.1))
    with pytest.raises(TypeError, match="optimizer"):
        Cascade(layer, [layer.lora_A, layer.lora_B])
    with pytest.raises(ValueError, match="lora_B"):
        Cascade(layer, torch.optim.SGD([layer.lora_A], lr=0.1))


def test_diverged_fast_lora_stops_the_boundary_before_any_merge():
    model = nn.Sequential(LoRASCLinear(IN, OUT, r=RANK), LoRASCLinear(OUT, OUT, r=RANK))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    cascade = Cascade(model, optimizer, keep_history=True)
    with torch.no_grad():
        model[0].lora_B.normal_()
        model[1].lora_B.fill_(float("nan"))
    weights = [layer.weight.clone() for layer in model]
    lora_a = model[0].lora_A.clone()
    with pytest.raises(ValueError, match=r"1\.lora_B has non-finite values"):
        cascade.end_epoch()
    assert all(torch.equal(layer.weight, w) for layer, w in zip(model, weights, strict=True))
    assert torch.equal(model[0].lora_A, lora_a)
    assert cascade.cascade_index == 0 and not any(cascade.history.values())


def test_load_state_dict_refuses_mismatched_counters():
    layer, optimizer = one_layer()
    cascade = Cascade(layer, optimizer)
    state = cascade.state_dict()
    with pytest.raises(ValueError, match="noise_scales"):
        cascade.load_state_dict({**state, "noise_scales": [0.1, 0.2]})
    with pytest.raises(ValueError, match="cascade_index"):
        cascade.load_state_dict({**state, "cascade_index": -1})
