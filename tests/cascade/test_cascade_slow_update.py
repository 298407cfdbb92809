"""Cascade: the slow update of the other trained parameters, and the per-cascade warm-up."""

import io
import logging

import pytest
import torch
from torch import nn

from lorasc_kernels import Cascade, LoRASCConfig, inject_lorasc

IN, HIDDEN, OUT = 13, 11, 5


def model_with_head(dtype=torch.float32):
    """A LoRASC layer (r=2) feeding a new trainable head with a trainable LayerNorm."""
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, OUT))
    model.to(dtype)
    inject_lorasc(model, LoRASCConfig(r=2, lora_alpha=4, target_modules=["0"]))
    model[1].requires_grad_(True)
    model[2].requires_grad_(True)
    return model


def adam(model):
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def train_step(model, optimizer, x):
    loss = model(x).float().pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def others(model):
    """The non-LoRA trainable parameters, by name."""
    return {
        name: p for name, p in model.named_parameters() if p.requires_grad and "lora" not in name
    }


def test_other_parameters_are_found_in_optimizer_order():
    model = model_with_head()
    cascade = Cascade(model, adam(model), steps_per_cascade=2, slow_rate=0.5)
    update = cascade.slow_update
    assert [p.shape for p in update.params] == [p.shape for p in others(model).values()]
    assert all(p is q for p, q in zip(update.params, others(model).values(), strict=True))
    assert all(
        torch.equal(a, p) and a.data_ptr() != p.data_ptr()
        for a, p in zip(update.anchors, update.params, strict=True)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_boundary_moves_other_parameters_slow_rate_of_the_way(dtype):
    model, x = model_with_head(dtype), torch.randn(6, IN).to(dtype)
    optimizer = adam(model)
    cascade = Cascade(model, optimizer, steps_per_cascade=2, slow_rate=0.3, noise_mode="off")
    for _ in range(2):  # two cascades: the anchor of the second is the first's result
        start = {name: p.detach().clone() for name, p in others(model).items()}
        train_step(model, optimizer, x)
        assert not cascade.step()
        train_step(model, optimizer, x)
        fast = {name: p.detach().clone() for name, p in others(model).items()}
        assert cascade.step()
        for name, p in others(model).items():
            assert not torch.equal(fast[name], start[name]), name
            assert torch.equal(p, torch.lerp(start[name], fast[name], 0.3)), name
        for anchor, p in zip(cascade.slow_update.anchors, cascade.slow_update.params, strict=True):
            assert torch.equal(anchor, p)
        for p in others(model).values():  # their Adam moments go on
            assert optimizer.state[p]["step"] == 2 * (cascade.cascade_index)
        layer = model[0]
        assert layer.lora_A not in optimizer.state and layer.lora_B not in optimizer.state


def test_finalize_applies_the_slow_update_too():
    model, x = model_with_head(), torch.randn(6, IN)
    optimizer = adam(model)
    cascade = Cascade(model, optimizer, steps_per_cascade=4, slow_rate=0.5, noise_mode="off")
    start = model[2].weight.detach().clone()
    train_step(model, optimizer, x)
    cascade.step()
    fast = model[2].weight.detach().clone()
    cascade.finalize()
    assert torch.equal(model[2].weight, torch.lerp(start, fast, 0.5))


@pytest.mark.parametrize(
    "settings",
    [{"slow_rate": 0.5, "slow_other_params": False}, {"slow_rate": 1.0}, {}],
    ids=["off", "slow_rate=1", "defaults"],
)
def test_other_parameters_keep_their_value_when_off_or_at_slow_rate_one(settings):
    model, x = model_with_head(), torch.randn(6, IN)
    optimizer = adam(model)
    cascade = Cascade(model, optimizer, steps_per_cascade=1, **settings)
    assert cascade.slow_update.params == [] and cascade.slow_update.anchors == []
    train_step(model, optimizer, x)
    fast = {name: p.detach().clone() for name, p in others(model).items()}
    assert cascade.step()
    for name, p in others(model).items():
        assert torch.equal(p, fast[name]), name


def test_lr_lambda_is_the_schedule_times_a_jagged_warmup():
    model, x = model_with_head(), torch.randn(6, IN)
    optimizer = adam(model)
    cascade = Cascade(model, optimizer, steps_per_cascade=4, warmup_steps=3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cascade.lr_lambda(lambda step: 0.5**step)
    )
    seen = []
    for _ in range(9):
        seen.append(optimizer.param_groups[0]["lr"])
        train_step(model, optimizer, x)
        cascade.step()
        scheduler.step()
    warmup = [1 / 3, 2 / 3, 1.0, 1.0] * 2 + [1 / 3]
    assert seen == pytest.approx([1e-2 * 0.5**k * w for k, w in enumerate(warmup)], rel=1e-12)
    other = model_with_head()
    assert Cascade(other, adam(other)).lr_factor() == 1.0  # no warm-up by default


def test_lr_lambda_without_schedule_counts_steps_of_a_per_epoch_cascade():
    model = model_with_head()
    optimizer = adam(model)
    cascade = Cascade(model, optimizer, warmup_steps=2)
    factor = cascade.lr_lambda()
    assert factor(0) == 0.5
    cascade.step()
    assert factor(1) == 1.0
    cascade.end_epoch()
    assert factor(2) == 0.5


def test_warmup_without_lr_lambda_is_reported_at_the_first_boundary(caplog):
    model = model_with_head()
    cascade = Cascade(model, adam(model), steps_per_cascade=2, warmup_steps=1)
    with caplog.at_level(logging.WARNING, logger="lorasc_kernels"):
        cascade.step()
        cascade.step()
    assert "warmup_steps=1) has no effect" in caplog.text
    wired = model_with_head()
    wired_cascade = Cascade(wired, adam(wired), steps_per_cascade=2, warmup_steps=1)
    wired_cascade.lr_lambda()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lorasc_kernels"):
        wired_cascade.step()
        wired_cascade.step()
    assert "no effect" not in caplog.text


def build_run():
    """bf16 model with head, AdamW, a warm-up schedule and a Cascade of 3 steps."""
    model = model_with_head(torch.bfloat16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    cascade = Cascade(
        model,
        optimizer,
        steps_per_cascade=3,
        seed=4,
        warmup_steps=2,
        slow_rate=0.5,
        noise_lambda=0.15,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cascade.lr_lambda(lambda step: 1.0 / (1 + step))
    )
    return model, optimizer, scheduler, cascade


def run_steps(run, batches):
    model, optimizer, scheduler, cascade = run
    for x in batches:
        train_step(model, optimizer, x)
        cascade.step()
        scheduler.step()


def test_resume_mid_cascade_with_anchors_and_warmup_is_bit_exact():
    batches = [torch.randn(4, IN).to(torch.bfloat16) for _ in range(8)]
    torch.manual_seed(0)
    uninterrupted = build_run()
    run_steps(uninterrupted, batches)

    torch.manual_seed(0)
    first = build_run()
    run_steps(first, batches[:4])  # one step into the second cascade
    buffer = io.BytesIO()
    torch.save(
        {
            name: part.state_dict()
            for name, part in zip(
                ("model", "optimizer", "scheduler", "cascade"), first, strict=True
            )
        },
        buffer,
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    torch.manual_seed(1)  # other initial weights: everything must come from the state
    resumed = build_run()
    for name, part in zip(("model", "optimizer", "scheduler", "cascade"), resumed, strict=True):
        part.load_state_dict(saved[name])
    run_steps(resumed, batches[4:])  # crosses the boundary after step 6

    expected = uninterrupted[0].state_dict()
    for key, value in resumed[0].state_dict().items():
        assert torch.equal(value, expected[key]), key
    for anchor, reference in zip(
        resumed[3].slow_update.anchors, uninterrupted[3].slow_update.anchors, strict=True
    ):
        assert torch.equal(anchor, reference)
    assert resumed[1].param_groups[0]["lr"] == uninterrupted[1].param_groups[0]["lr"]


def fresh_cascade(**settings):
    model = model_with_head()
    return Cascade(model, adam(model), steps_per_cascade=2, slow_rate=0.5, **settings)


def test_load_state_dict_refuses_anchors_of_other_parameters():
    state = fresh_cascade().state_dict()
    fewer = dict(state, anchors=state["anchors"][:-1])
    with pytest.raises(ValueError, match="anchors"):
        fresh_cascade().load_state_dict(fewer)
    reshaped = dict(state, anchors=[a.reshape(-1, 1) for a in state["anchors"]])
    with pytest.raises(ValueError, match=r"anchors'\]\[0\]"):
        fresh_cascade().load_state_dict(reshaped)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"steps_per_cascade": 3, "warmup_steps": 4}, ValueError, "warmup_steps"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"warmup_steps": 1.5}, TypeError, "warmup_steps"),
        ({"slow_other_params": 1}, TypeError, "slow_other_params"),
    ],
)
def test_bad_slow_update_and_warmup_settings_raise(kwargs, error, match):
    model = model_with_head()
    with pytest.raises(error, match=match):
        Cascade(model, adam(model), **kwargs)
