"""Hostile use of the stateful paths: Cascade construction and state, layer state dicts
across weight formats, injection into fp8, a model cast mid-run. Each refused call raises
naming the argument, entry or layer, and leaves everything bit-identical (``refused``)."""

import pytest
import torch
from torch import nn

from lorasc_kernels import Cascade, LoRASCConfig, LoRASCLinear, inject_lorasc
from tests.test_hostile import (
    HIDDEN,
    IN,
    OUT,
    RANK,
    callback_and_run,
    refused,
    trained,
    two_layers,
    with_head,
)

FP8 = "fp8_e4m3"


def fp8_layers():
    """Two fp8 LoRASC layers (paths "0" and "2") and an Adam over their fast LoRAs."""
    return two_layers(weight_format=FP8)


# -- Cascade.load_state_dict: every entry checked before any is taken -------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_anchors_are_refused_before_any_is_taken(bad):
    model, optimizer = with_head()
    cascade = Cascade(model, optimizer, steps_per_cascade=2, slow_rate=0.5)
    state = cascade.state_dict()
    trained(model, optimizer, 3, cascade)
    anchors = [anchor.clone() for anchor in state["anchors"]]
    anchors[1][0] = bad
    refused(
        ValueError,
        r"state\['anchors'\]\[1\] has non-finite values",
        lambda: cascade.load_state_dict(dict(state, anchors=anchors)),
        model,
        optimizer,
        cascade,
    )


def test_meta_anchors_are_refused_before_any_counter_changes():
    model, optimizer = with_head()
    cascade = Cascade(model, optimizer, steps_per_cascade=2, slow_rate=0.5)
    state = cascade.state_dict()
    trained(model, optimizer, 3, cascade)
    anchors = [anchor.to("meta") for anchor in state["anchors"]]
    refused(
        ValueError,
        r"state\['anchors'\]\[0\] is on the meta device",
        lambda: cascade.load_state_dict(dict(state, anchors=anchors)),
        model,
        optimizer,
        cascade,
    )


def test_a_non_finite_kept_update_is_refused():
    model, optimizer = two_layers()
    cascade = Cascade(model, optimizer, steps_per_cascade=2, keep_history=True)
    trained(model, optimizer, 2, cascade)
    state = cascade.state_dict()
    scaled_b, lora_a = (t.clone() for t in state["history"]["2"][0])
    lora_a[0, 0] = float("nan")
    bad = dict(state, history=dict(state["history"], **{"2": [(scaled_b, lora_a)]}))
    refused(
        ValueError,
        r"state\['history'\]\['2'\]\[0\] \(A\) has non-finite",
        lambda: cascade.load_state_dict(bad),
        model,
        optimizer,
        cascade,
    )


# -- construction checks what it will later rely on ------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_cascade_without_noise_refuses_a_non_finite_weight_naming_the_layer(bad):
    model, optimizer = two_layers()
    with torch.no_grad():
        model[2].weight[3, 1] = bad
    refused(
        ValueError,
        r"layer '2': weight has non-finite values",
        lambda: Cascade(model, optimizer),
        model,
        optimizer,
    )


@pytest.mark.parametrize("bad", [float("nan"), -0.5, 0.0, float("inf")])
def test_a_cascade_refuses_bad_fp8_scales_naming_the_layer(bad):
    model, optimizer = fp8_layers()
    model[2].weight_scale[1] = bad
    refused(
        ValueError,
        r"layer '2': weight_scale must be positive and finite",
        lambda: Cascade(model, optimizer),
        model,
        optimizer,
    )


def test_a_cascade_refuses_nan_fp8_codes_naming_the_layer():
    model, optimizer = fp8_layers()
    codes = model[0].weight.data.view(torch.uint8)
    codes[2, 2] = 0x7F  # e4m3fn's NaN
    refused(
        ValueError,
        r"layer '0': weight has non-finite values",
        lambda: Cascade(model, optimizer),
        model,
        optimizer,
    )


def test_from_state_dict_refuses_fused_noise_on_fp8_layers():
    model, optimizer = two_layers()
    state = Cascade(model, optimizer, noise_lambda=0.1, noise_mode="fused").state_dict()
    fp8_model, fp8_optimizer = fp8_layers()
    refused(
        ValueError,
        r"layer '0': noise_mode='fused' is not supported on fp8_e4m3",
        lambda: Cascade.from_state_dict(fp8_model, fp8_optimizer, state),
        fp8_model,
        fp8_optimizer,
    )
    Cascade(fp8_model, fp8_optimizer)  # the refused one claimed nothing


def test_in_place_noise_larger_than_the_weights_is_refused():
    model, optimizer = two_layers()
    refused(
        ValueError,
        "noise_lambda=1e\\+12 with noise_mode='inplace'",
        lambda: Cascade(model, optimizer, noise_lambda=1e12),
        model,
        optimizer,
    )
    cascade = Cascade(model, optimizer, noise_lambda=1e12, noise_mode="fused")  # W stays clean
    before = model[0].weight.clone()
    final = cascade.finalize()
    assert torch.equal(final[0].weight, before)


def test_use_optimizer_takes_the_same_parameters_in_another_order():
    model, optimizer = with_head()
    cascade = Cascade(model, optimizer, steps_per_cascade=2, slow_rate=0.5)
    reordered = torch.optim.Adam([p for p in model.parameters() if p.requires_grad][::-1], lr=1e-2)
    cascade.use_optimizer(reordered)
    trained(model, reordered, 2, cascade)
    assert cascade.optimizer is reordered and cascade.cascade_index == 1


# -- a model cast between boundaries ---------------------------------------------------------


def test_a_model_cast_between_boundaries_runs_the_next_boundary_in_the_new_dtype():
    model, optimizer = with_head()
    cascade = Cascade(model, optimizer, steps_per_cascade=2, slow_rate=0.5)
    trained(model, optimizer, 1, cascade)
    model.to(torch.bfloat16)
    head = model[1].weight
    anchor = cascade.slow_update.anchors[0].to(torch.bfloat16)
    expected = anchor.lerp(head.detach(), 0.5)
    assert cascade.step()  # the boundary, in bfloat16
    assert torch.equal(head.detach(), expected)
    assert all(a.dtype == torch.bfloat16 for a in cascade.slow_update.anchors)


def test_a_slow_updated_parameter_that_changed_shape_stops_the_boundary_before_any_merge():
    model, optimizer = with_head()
    cascade = Cascade(model, optimizer, steps_per_cascade=2, slow_rate=0.5)
    trained(model, optimizer, 1, cascade)
    model[1].bias.data = torch.zeros(OUT + 1)
    refused(
        ValueError,
        r"1.bias changed shape from \(5,\) to \(6,\)",
        cascade.step,
        model,
        optimizer,
        cascade,
    )


# -- inject_lorasc and from_linear into fp8 --------------------------------------------------


def test_inject_fp8_refuses_a_later_non_finite_weight_before_the_model_changes():
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))
    with torch.no_grad():
        model[2].weight[0, 1] = float("nan")
    refused(
        ValueError,
        r"layer '2': linear.weight has non-finite values",
        lambda: inject_lorasc(model, LoRASCConfig(r=RANK, weight_format=FP8)),
        model,
    )
    assert all(p.requires_grad for p in model.parameters())


def test_from_linear_refusing_leaves_the_linear_trainable():
    linear = nn.Linear(IN, OUT)
    with torch.no_grad():
        linear.weight[1, 1] = float("inf")
    refused(
        ValueError,
        "linear.weight has non-finite values",
        lambda: LoRASCLinear.from_linear(linear, r=RANK, weight_format=FP8),
        linear,
    )
    assert linear.weight.requires_grad and linear.bias.requires_grad


@pytest.mark.parametrize("weight_format", [["fp8_e4m3"], {"fp8": 1}, 8])
def test_an_unhashable_or_non_str_weight_format_is_refused_by_name(weight_format):
    with pytest.raises(ValueError, match="weight_format must be None or one of"):
        LoRASCLinear(IN, OUT, r=RANK, weight_format=weight_format)
    with pytest.raises(ValueError, match="weight_format must be None or one of"):
        LoRASCConfig(weight_format=weight_format)


# -- LoRASCLinear.load_state_dict across weight formats --------------------------------------


@pytest.mark.parametrize("strict", [True, False])
def test_an_fp8_state_into_a_float_layer_is_refused_before_any_copy(strict):
    state = LoRASCLinear(IN, OUT, r=RANK, weight_format=FP8).state_dict()
    layer = LoRASCLinear(IN, OUT, r=RANK)
    refused(
        ValueError,
        r"weight: the state holds a scaled weight",
        lambda: layer.load_state_dict(state, strict=strict),
        layer,
    )


@pytest.mark.parametrize("strict", [True, False])
def test_a_float_state_into_an_fp8_layer_is_refused_before_any_copy(strict):
    state = LoRASCLinear(IN, OUT, r=RANK).state_dict()
    layer = LoRASCLinear(IN, OUT, r=RANK, weight_format=FP8)
    refused(
        ValueError,
        "weight and weight_scale load together",
        lambda: layer.load_state_dict(state, strict=strict),
        layer,
        layer.weight_scale,
    )
    state["weight_scale"] = torch.ones(OUT)
    refused(
        ValueError,
        r"weight: this layer has weight_format='fp8_e4m3'",
        lambda: layer.load_state_dict(state, strict=strict),
        layer,
        layer.weight_scale,
    )


@pytest.mark.parametrize(
    "scale, match",
    [
        (torch.ones(OUT + 1), r"weight_scale: the state's shape \(6,\) is not this layer's \(5,\)"),
        (torch.ones(OUT, 1), r"weight_scale: the state's shape \(5, 1\) is not this layer's"),
        (torch.full((OUT,), -1.0), "weight_scale must be positive and finite"),
        (torch.full((OUT,), 1e-30), "weight_scale must be positive and finite, at least 2"),
    ],
    ids=["long", "2-D", "negative", "below-the-floor"],
)
def test_an_fp8_state_with_bad_scales_is_refused_before_any_copy(scale, match):
    layer = LoRASCLinear(IN, OUT, r=RANK, weight_format=FP8)
    state = LoRASCLinear(IN, OUT, r=RANK, weight_format=FP8).state_dict()
    state["weight_scale"] = scale
    refused(ValueError, match, lambda: layer.load_state_dict(state), layer, layer.weight_scale)


def test_a_state_of_the_same_format_still_loads():
    source = LoRASCLinear(IN, OUT, r=RANK, weight_format=FP8)
    layer = LoRASCLinear(IN, OUT, r=RANK, weight_format=FP8)
    layer.load_state_dict(source.state_dict())
    assert torch.equal(layer.weight.view(torch.uint8), source.weight.view(torch.uint8))
    assert torch.equal(layer.weight_scale, source.weight_scale)
    partial = {"lora_B": torch.ones(OUT, RANK)}
    layer.load_state_dict(partial, strict=False)  # neither weight nor scales: nothing to pair
    assert torch.equal(layer.lora_B, torch.ones(OUT, RANK))


# -- the Trainer callback's checkpoint file --------------------------------------------------


def test_a_corrupt_cascade_checkpoint_is_named_by_its_path(tmp_path):
    hf_callback, callback, model, optimizer, args, state = callback_and_run(tmp_path, 6)
    folder = tmp_path / "checkpoint-6"
    folder.mkdir()
    (folder / hf_callback.CHECKPOINT_FILE).write_bytes(b"not a torch file")
    refused(
        ValueError,
        r"checkpoint-6/lorasc_cascade.pt cannot be read",
        lambda: callback.on_train_begin(args, state, None, model=model, optimizer=optimizer),
        model,
        optimizer,
    )


# -- settings and counters that W depends on ---------------------------------------------------


def test_settings_are_read_only_after_construction():
    import dataclasses

    model, optimizer = two_layers()
    cascade = Cascade(model, optimizer, noise_lambda=0.1)
    with pytest.raises(AttributeError):
        cascade.settings = dataclasses.replace(cascade.settings, noise_lambda=0.0)
    assert cascade.settings.noise_lambda == 0.1


@pytest.mark.parametrize("setting", ["noise_lambda", "noise_mode", "seed"])
def test_a_state_missing_a_setting_that_w_depends_on_is_refused_by_name(setting):
    model, optimizer = two_layers()
    cascade = Cascade(model, optimizer, noise_lambda=0.1, steps_per_cascade=2, seed=5)
    trained(model, optimizer, 1, cascade)
    state = cascade.state_dict()
    del state["settings"][setting]
    other, other_optimizer = two_layers()
    other.load_state_dict(model.state_dict())
    refused(
        ValueError,
        rf"state\['settings'\] lacks \['{setting}'\]: the noise the saved W carries",
        lambda: Cascade.from_state_dict(other, other_optimizer, state),
        other,
        other_optimizer,
    )


@pytest.mark.parametrize("index", [2**32 - 1, 2**64])
def test_a_cascade_index_past_the_seed_range_is_refused_by_name(index):
    model, optimizer = two_layers()
    cascade = Cascade(model, optimizer, steps_per_cascade=2)
    state = dict(cascade.state_dict(), cascade_index=index)
    refused(
        ValueError,
        r"state\['cascade_index'\] must be <= 4294967294",
        lambda: cascade.load_state_dict(state),
        model,
        optimizer,
        cascade,
    )


# -- the callback's arguments, checked at construction -----------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"metrics_every": -1}, ValueError, "metrics_every must be >= 0"),
        ({"metrics_every": 1.5}, TypeError, "metrics_every must be an int"),
        ({"metrics_layer": 3}, TypeError, "metrics_layer must be a layer's module path"),
    ],
    ids=["negative", "float", "not-a-name"],
)
def test_callback_arguments_are_checked_at_construction(tmp_path, kwargs, error, match):
    hf_callback = pytest.importorskip("lorasc_kernels.integrations.hf_callback")
    with pytest.raises(error, match=match):
        hf_callback.LoRASCCallback(**kwargs)


def test_callback_metrics_layer_is_checked_before_any_noise_is_written(tmp_path):
    _, callback, model, optimizer, args, state = callback_and_run(
        tmp_path, metrics_layer="nope", noise_lambda=0.1
    )
    refused(
        ValueError,
        r"metrics_layer='nope'\) is not one of the model's driven layers \['0', '2'\]",
        lambda: callback.on_train_begin(args, state, None, model=model, optimizer=optimizer),
        model,
        optimizer,
    )
    callback.metrics_layer = "2"  # a retry with a right name runs
    callback.on_train_begin(args, state, None, model=model, optimizer=optimizer)
    assert callback.cascade.metrics.layer == "2"
