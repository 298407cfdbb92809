"""Hostile use of the public API: every refused call raises a clear error naming the argument
or the layer, and leaves every weight, the model's structure, the optimizer's state and the
Cascade's counters bit-identical (one snapshot helper, :func:`refused`, checks all three).

Groups, as in docs/reliability.md: (1) nothing half-done, (2) misuse refused, (3) values
that would destroy weights, (4) PEFT export for any module names, (5) what PEFT and
``nn.Linear`` accept, we accept; the rest is refused with a ``TypeError`` naming it.
"""

import io
import json

import numpy as np
import pytest
import torch
from torch import nn

from lorasc_kernels import (
    Cascade,
    LoRASCConfig,
    LoRASCLinear,
    inject_lorasc,
    lorasc_linear,
    merge_lowrank_,
)
from lorasc_kernels.cascade.state import STATE_KEYS
from lorasc_kernels.distributed import is_dtensor
from lorasc_kernels.integrations.peft_adapter import write_peft_adapter
from tests.helpers import trainer_args_and_state

IN, HIDDEN, OUT, RANK = 7, 6, 5, 2


# -- the snapshot: every bit a failed call must leave alone ----------------------------------


def _bits(tensor: torch.Tensor) -> tuple:
    """dtype, shape and exact bytes of ``tensor`` (NaN compares equal to itself here; this
    rank's shard of an FSDP2 parameter)."""
    tensor = tensor.detach()
    if is_dtensor(tensor):
        tensor = tensor.to_local()
    if tensor.is_meta:
        return str(tensor.dtype), tuple(tensor.shape), "meta"
    raw = tensor.reshape(-1).contiguous().cpu().view(torch.uint8)
    return str(tensor.dtype), tuple(tensor.shape), raw.numpy().tobytes()


def _snap(value):
    if isinstance(value, torch.Tensor):
        return _bits(value)
    if isinstance(value, LoRASCLinear):  # also its noise, which the forward reads
        return (_snap_module(value), value.noise_seed, value.noise_scale, value.weight_noise)
    if isinstance(value, nn.Module):
        return _snap_module(value)
    if isinstance(value, torch.optim.Optimizer):
        groups = [
            {k: [id(p) for p in v] if k == "params" else _snap(v) for k, v in g.items()}
            for g in value.param_groups
        ]
        return groups, {id(p): _snap(state) for p, state in value.state.items()}
    if isinstance(value, Cascade):
        return (
            _snap(value.state_dict()),
            id(value.optimizer),
            id(value.model),
            [id(layer) for layer in value.layers.values()],
        )
    if isinstance(value, dict):
        return {k: _snap(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_snap(v) for v in value]
    return value


def _snap_module(module: nn.Module) -> tuple:
    structure = [
        (name, type(m).__name__, id(m)) for name, m in module.named_modules(remove_duplicate=False)
    ]
    parameters = {
        name: (_bits(p), p.requires_grad)
        for name, p in module.named_parameters(remove_duplicate=False)
    }
    layers = {
        name: (m.noise_seed, m.noise_scale, m.weight_noise)
        for name, m in module.named_modules()
        if isinstance(m, LoRASCLinear)
    }
    return structure, parameters, layers


def refused(error, match, call, *watched):
    """``call()`` raises ``error`` with a message matching ``match`` (which names the argument
    or layer), and every object of ``watched`` is bit-identical afterwards."""
    before = _snap(list(watched))
    with pytest.raises(error, match=match) as info:
        call()
    assert _snap(list(watched)) == before
    return info.value


# -- builders ---------------------------------------------------------------------------------


def two_layers(dtype=torch.float32, **layer_kwargs):
    """Two LoRASC layers (paths "0" and "2") and an Adam over their fast LoRAs."""
    model = nn.Sequential(
        LoRASCLinear(IN, HIDDEN, r=RANK, dtype=dtype, **layer_kwargs),
        nn.Tanh(),
        LoRASCLinear(HIDDEN, OUT, r=RANK, dtype=dtype, **layer_kwargs),
    )
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer


def trained(model, optimizer, steps=1, cascade=None):
    """``steps`` optimizer steps (and ``cascade.step()`` after each); optimizer state filled."""
    x = torch.randn(4, IN).to(next(model.parameters()).dtype)
    for _ in range(steps):
        model(x).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if cascade is not None:
            cascade.step()


def merge_args(dtype=torch.float32, rows=OUT, cols=IN):
    weight = torch.randn(rows, cols).to(dtype)
    return weight, torch.randn(rows, RANK).to(dtype), torch.randn(RANK, cols).to(dtype)


def with_head():
    """One LoRASC layer and a trainable head: a Cascade of ``slow_rate < 1`` keeps anchors
    for the head."""
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, OUT))
    inject_lorasc(model, LoRASCConfig(r=RANK, target_modules=["0"]))
    model[1].requires_grad_(True)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer


# == 1. nothing half-done ====================================================================


def test_step_refused_at_a_diverged_boundary_leaves_the_count_so_the_schedule_recovers():
    model, optimizer = two_layers()
    cascade = Cascade(model, optimizer, steps_per_cascade=2)
    trained(model, optimizer, 1, cascade)
    trained(model, optimizer, 1)
    with torch.no_grad():
        model[2].lora_A[0, 0] = float("nan")
    refused(ValueError, r"2\.lora_A has non-finite", cascade.step, model, optimizer, cascade)
    with torch.no_grad():
        model[2].lora_A[0, 0] = 0.1  # repaired: the step that was refused now ends the cascade
    assert cascade.step() and cascade.cascade_index == 1


@pytest.mark.parametrize("method", ["end_epoch", "finalize"])
def test_diverged_lora_stops_end_epoch_and_finalize(method):
    model, optimizer = two_layers()
    cascade = Cascade(model, optimizer, keep_history=True)
    trained(model, optimizer, 2, cascade)
    with torch.no_grad():
        model[0].lora_B.fill_(float("inf"))
    refused(
        ValueError, r"0\.lora_B has non-finite", getattr(cascade, method), model, optimizer, cascade
    )


def test_a_diverged_slow_updated_head_stops_the_boundary_naming_it():
    model, optimizer = with_head()
    cascade = Cascade(model, optimizer, slow_rate=0.5, noise_lambda=0.15)
    trained(model, optimizer, 2, cascade)
    with torch.no_grad():
        model[1].bias[1] = float("nan")
    refused(ValueError, r"^1\.bias has non-finite", cascade.end_epoch, model, optimizer, cascade)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("noise_mode", ["inplace", "fused"])
def test_a_later_layer_with_a_non_finite_weight_stops_the_cascade_before_any_noise(bad, noise_mode):
    model, optimizer = two_layers()
    with torch.no_grad():
        model[2].weight[1, 3] = bad
    refused(
        ValueError,
        r"layer '2': weight has non-finite",
        lambda: Cascade(model, optimizer, noise_mode=noise_mode, noise_lambda=0.15),
        model,
        optimizer,
    )
    with torch.no_grad():
        model[2].weight[1, 3] = 0.5
    Cascade(model, optimizer, noise_mode=noise_mode)  # the failed one claimed nothing


def test_a_later_layer_with_a_non_finite_weight_stops_the_first_boundary():
    model, optimizer = two_layers()
    cascade = Cascade(model, optimizer, noise_mode="off")
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    refused(
        ValueError,
        r"layer '2': weight has non-finite values \(row 0\)",
        cascade.end_epoch,
        model,
        optimizer,
        cascade,
    )


@pytest.mark.parametrize("noise_mode", ["inplace", "fused"])
def test_noise_that_would_overflow_fp16_is_refused_before_any_layer_changes(noise_mode):
    model, optimizer = two_layers(torch.float16)
    with torch.no_grad():
        weight = model[2].weight  # ±6e4, std 6e4: W + noise > 65504 in layer '2' only
        weight.copy_(
            torch.where(torch.arange(weight.numel()).reshape(weight.shape) % 2 == 0, 6e4, -6e4)
        )
    refused(
        ValueError,
        r"layer '2'",
        lambda: Cascade(model, optimizer, noise_lambda=1.0, noise_mode=noise_mode),
        model,
        optimizer,
    )


def test_merge_into_an_inference_tensor_is_refused_before_any_row_is_written():
    with torch.inference_mode():
        weight = torch.randn(OUT, IN)
    _, lora_b, lora_a = merge_args()
    refused(
        ValueError,
        "weight was created under torch.inference_mode",
        lambda: merge_lowrank_(weight, lora_b, lora_a, 0.5),
        weight,
    )
    with torch.inference_mode():  # where torch allows the write, the merge runs
        merge_lowrank_(weight, lora_b, lora_a, 0.5)


def test_merge_into_a_meta_weight_is_refused():
    weight = torch.empty(OUT, IN, device="meta")
    lora_b, lora_a = torch.empty(OUT, RANK, device="meta"), torch.empty(RANK, IN, device="meta")
    refused(
        ValueError,
        "weight is on the meta device",
        lambda: merge_lowrank_(weight, lora_b, lora_a, 0.5, backend="torch"),
        weight,
    )


def test_a_cascade_over_a_meta_model_is_refused_naming_the_layer():
    with torch.device("meta"):
        model, optimizer = two_layers()
    refused(
        ValueError,
        r"layer '0': weight is on the meta device",
        lambda: Cascade(model, optimizer),
        model,
    )


def cascade_with_state(**settings):
    """A Cascade (steps of 3) after two boundaries, and its state_dict."""
    model, optimizer = two_layers()
    cascade = Cascade(model, optimizer, steps_per_cascade=3, **settings)
    trained(model, optimizer, 7, cascade)
    return model, optimizer, cascade, cascade.state_dict()


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda s: s.pop("history"), ValueError, r"lacks \['history'\]"),
        (lambda s: s.pop("anchors"), ValueError, r"lacks \['anchors'\]"),
        (
            lambda s: s.update(cascade_index="1"),
            TypeError,
            r"state\['cascade_index'\] must be an int",
        ),
        (
            lambda s: s.update(cascade_index=-2),
            ValueError,
            r"state\['cascade_index'\] must be >= 0",
        ),
        (
            lambda s: s.update(steps_in_cascade=3),
            ValueError,
            r"state\['steps_in_cascade'\] must be <=",
        ),
        (lambda s: s.update(steps_in_cascade=1.0), TypeError, r"state\['steps_in_cascade'\]"),
        (
            lambda s: s.update(noise_scales=[0.1, float("nan")]),
            ValueError,
            r"state\['noise_scales'\]\[1\] must be finite",
        ),
        (
            lambda s: s.update(noise_scales=[0.1]),
            ValueError,
            r"state\['noise_scales'\] must be a list of 2",
        ),
        (lambda s: s.update(noise_scales=[0.1, -0.2]), ValueError, r"state\['noise_scales'\]\[1\]"),
        (lambda s: s.update(finalized=True), ValueError, r"state\['finalized'\]"),
        (lambda s: s.update(layer_names=["2", "0"]), ValueError, r"state\['layer_names'\]"),
        (lambda s: s["settings"].update(seed=99), ValueError, r"state\['settings'\]"),
        (lambda s: s.update(history={"0": []}), ValueError, r"state\['history'\] must be a dict"),
        (
            lambda s: s.update(history={"0": [], "2": "x"}),
            TypeError,
            r"state\['history'\]\['2'\] must be a list",
        ),
        (lambda s: s.update(anchors=[torch.zeros(3)]), ValueError, "anchors"),
    ],
    ids=[
        "no-history",
        "no-anchors",
        "index-type",
        "index-negative",
        "steps-too-many",
        "steps-type",
        "scale-nan",
        "scales-count",
        "scale-negative",
        "finalized",
        "layer-names",
        "settings",
        "history-keys",
        "history-pair",
        "anchors",
    ],
)
def test_a_malformed_state_is_refused_before_any_counter_changes(change, error, match):
    model, optimizer, cascade, state = cascade_with_state()
    fresh = {key: dict(value) if isinstance(value, dict) else value for key, value in state.items()}
    change(fresh)
    trained(model, optimizer, 1, cascade)  # counters away from the saved ones
    refused(error, match, lambda: cascade.load_state_dict(fresh), model, optimizer, cascade)
    cascade.load_state_dict(state)  # and a good state still loads
    assert (cascade.cascade_index, cascade.steps_in_cascade) == (2, 1)


def test_state_keys_are_those_of_state_dict():
    assert set(cascade_with_state()[3]) == set(STATE_KEYS)


def test_history_in_a_state_without_keep_history_is_refused():
    model, optimizer, cascade, state = cascade_with_state()
    pair = (torch.zeros(OUT, RANK), torch.zeros(RANK, HIDDEN))
    bad = dict(state, history={"0": [], "2": [pair]})
    refused(
        ValueError,
        r"state\['history'\]\['2'\] holds updates but keep_history is False",
        lambda: cascade.load_state_dict(bad),
        model,
        optimizer,
        cascade,
    )


def test_a_wrongly_shaped_kept_update_is_refused():
    model, optimizer, cascade, state = cascade_with_state(keep_history=True)
    bad = dict(
        state,
        history=dict(state["history"], **{"2": [(torch.zeros(OUT, RANK), torch.zeros(RANK, IN))]}),
    )
    refused(
        ValueError,
        r"state\['history'\]\['2'\]\[0\] must be a pair of tensors of shapes",
        lambda: cascade.load_state_dict(bad),
        model,
        optimizer,
        cascade,
    )


@pytest.mark.parametrize(
    "state, error, match",
    [
        ([1, 2], TypeError, "state must be a dict"),
        ({"cascade_index": 0}, ValueError, "'settings'"),
        ({"settings": {"steps": 3}}, TypeError, r"state\['settings'\]"),
    ],
    ids=["not-a-dict", "no-settings", "unknown-setting"],
)
def test_from_state_dict_refuses_a_malformed_state_and_claims_nothing(state, error, match):
    model, optimizer = two_layers()
    refused(
        error, match, lambda: Cascade.from_state_dict(model, optimizer, state), model, optimizer
    )
    Cascade(model, optimizer)


def test_from_state_dict_with_anchors_of_other_parameters_is_refused():
    model, optimizer = with_head()
    state = Cascade(model, optimizer, slow_rate=0.5).state_dict()
    other, other_optimizer = with_head()
    bad = dict(state, anchors=state["anchors"][:1])
    refused(
        ValueError,
        "anchors",
        lambda: Cascade.from_state_dict(other, other_optimizer, bad),
        other,
        other_optimizer,
    )


def test_anchors_of_the_wrong_shape_are_refused_before_any_anchor_is_copied():
    model, optimizer = with_head()
    cascade = Cascade(model, optimizer, steps_per_cascade=2, slow_rate=0.5)
    state = cascade.state_dict()
    trained(model, optimizer, 3, cascade)
    bad = dict(state, anchors=[state["anchors"][0] + 1, state["anchors"][1].reshape(-1, 1)])
    refused(
        ValueError,
        r"state\['anchors'\]\[1\]",
        lambda: cascade.load_state_dict(bad),
        model,
        optimizer,
        cascade,
    )


def test_inject_refuses_a_complex_layer_before_the_model_changes():
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, OUT, dtype=torch.complex64))
    refused(
        TypeError,
        r"layer '1': linear.weight's dtype must be",
        lambda: inject_lorasc(model, LoRASCConfig(r=RANK)),
        model,
    )


def test_inject_refuses_a_rank_too_large_for_a_later_layer():
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, 1))
    refused(
        ValueError,
        r"r=2 exceeds min\(in, out\)=1 of layer '1'",
        lambda: inject_lorasc(model, LoRASCConfig(r=2)),
        model,
    )


# == 2. misuse refused =======================================================================


@pytest.mark.parametrize("noise_mode", ["inplace", "fused", "off"])
def test_a_second_cascade_on_a_driven_model_is_refused(noise_mode):
    model, optimizer = two_layers()
    cascade = Cascade(model, optimizer, noise_mode=noise_mode)
    refused(ValueError, r"layer '0'", lambda: Cascade(model, optimizer), model, optimizer, cascade)
    refused(
        ValueError,
        r"layer '0' is driven by another Cascade",
        lambda: Cascade.from_state_dict(model, optimizer, cascade.state_dict()),
        model,
        optimizer,
        cascade,
    )


def test_a_cascade_over_weights_that_carry_another_runs_noise_is_refused():
    model, optimizer = two_layers()
    Cascade(model, optimizer, noise_lambda=0.15)  # dropped without finalize: noise stays in W
    refused(
        ValueError,
        r"layer '0': its weight carries the in-place noise",
        lambda: Cascade(model, optimizer),
        model,
        optimizer,
    )


def test_a_run_without_noise_leaves_nothing_that_stops_a_new_cascade():
    model, optimizer = two_layers()
    Cascade(model, optimizer, noise_lambda=0.0)  # dropped: W holds no noise
    Cascade(model, optimizer)


def test_after_finalize_the_model_can_get_a_new_cascade():
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, OUT))
    inject_lorasc(model, LoRASCConfig(r=RANK))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    Cascade(model, optimizer).finalize()
    inject_lorasc(model, LoRASCConfig(r=RANK))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    Cascade(model, optimizer)


def test_one_layer_under_two_module_paths_is_refused_by_the_cascade():
    layer = LoRASCLinear(IN, IN, r=RANK)
    model = nn.Sequential(layer, nn.Tanh(), layer)
    optimizer = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1)
    refused(
        ValueError,
        r"registered under two module paths, '0' and '2'",
        lambda: Cascade(model, optimizer),
        model,
        optimizer,
    )


def test_one_linear_under_two_module_paths_is_refused_by_inject():
    linear = nn.Linear(IN, IN)
    model = nn.Sequential(linear, nn.Tanh(), linear)
    refused(
        ValueError,
        r"two module paths, '0' and '2'",
        lambda: inject_lorasc(model, LoRASCConfig(r=RANK, target_modules=["2"])),
        model,
    )


def test_from_linear_refuses_a_lorasc_layer_and_keeps_its_lora():
    layer, _ = two_layers()
    with torch.no_grad():
        layer[0].lora_B.normal_()
    refused(
        TypeError,
        "linear is a LoRASCLinear already",
        lambda: LoRASCLinear.from_linear(layer[0]),
        layer,
    )


def test_an_optimizer_built_after_the_cascade_loses_its_fast_lora_state_at_boundaries():
    model, optimizer = two_layers()
    cascade = Cascade(model, optimizer, steps_per_cascade=2)
    replacement = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    trained(model, replacement, 1, cascade)
    assert replacement.state
    trained(model, replacement, 1, cascade)  # the boundary
    assert cascade.cascade_index == 1 and not replacement.state


def test_an_optimizer_of_other_parameters_keeps_its_state_at_boundaries():
    model, optimizer = two_layers()
    cascade = Cascade(model, optimizer, steps_per_cascade=1)
    other = nn.Linear(3, 3)
    other_optimizer = torch.optim.Adam(other.parameters(), lr=1e-2)
    other(torch.randn(2, 3)).sum().backward()
    other_optimizer.step()
    state = _snap(other_optimizer)
    trained(model, optimizer, 1, cascade)
    assert cascade.cascade_index == 1 and _snap(other_optimizer) == state


def test_use_optimizer_refuses_an_optimizer_missing_a_fast_lora():
    model, optimizer = two_layers()
    cascade = Cascade(model, optimizer)
    partial = torch.optim.SGD([model[0].lora_A, model[0].lora_B], lr=0.1)
    refused(
        ValueError,
        r"optimizer does not hold 2\.lora_A",
        lambda: cascade.use_optimizer(partial),
        model,
        optimizer,
        cascade,
    )
    refused(
        TypeError,
        "optimizer must be a torch.optim.Optimizer",
        lambda: cascade.use_optimizer([model[0].lora_A]),
        model,
        optimizer,
        cascade,
    )


def test_use_optimizer_refuses_other_slow_updated_parameters():
    model, optimizer = with_head()
    cascade = Cascade(model, optimizer, slow_rate=0.5)
    lora = [p for n, p in model.named_parameters() if "lora" in n]
    refused(
        ValueError,
        "other trainable parameters",
        lambda: cascade.use_optimizer(torch.optim.SGD(lora, lr=0.1)),
        model,
        optimizer,
        cascade,
    )
    replacement = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    cascade.use_optimizer(replacement)
    assert cascade.optimizer is replacement


def test_a_schedule_that_is_not_a_function_is_refused():
    model, optimizer = two_layers()
    cascade = Cascade(model, optimizer, steps_per_cascade=4, warmup_steps=2)
    refused(
        TypeError,
        "schedule must be None or a function",
        lambda: cascade.lr_lambda(0.5),
        model,
        optimizer,
        cascade,
    )


def test_calls_after_finalize_are_refused():
    model, optimizer = two_layers()
    cascade = Cascade(model, optimizer)
    cascade.finalize()
    for method, arguments in (
        ("step", ()),
        ("end_epoch", ()),
        ("finalize", ()),
        ("use_optimizer", (optimizer,)),
        ("load_state_dict", (cascade.state_dict(),)),
    ):
        refused(
            RuntimeError,
            rf"Cascade\.{method}\(\) after finalize",
            lambda m=method, a=arguments: getattr(cascade, m)(*a),
            model,
            optimizer,
            cascade,
        )


# == 3. values that would destroy weights ====================================================


@pytest.mark.parametrize(
    "dtype, coeff",
    [
        (torch.float32, 1e37),
        (torch.bfloat16, -1e37),
        (torch.float16, 1e4),
    ],
    ids=["fp32", "bf16", "fp16"],
)
def test_a_finite_coeff_that_would_overflow_the_weight_is_refused(dtype, coeff):
    weight, lora_b, lora_a = merge_args(dtype)
    with torch.no_grad():
        lora_b.mul_(10.0)
        lora_a.mul_(10.0)
    refused(
        ValueError,
        "the merge would overflow.*coeff",
        lambda: merge_lowrank_(weight, lora_b, lora_a, coeff),
        weight,
        lora_b,
        lora_a,
    )


@pytest.mark.parametrize("name", ["noise_add", "noise_remove"])
def test_noise_that_would_overflow_an_fp16_weight_is_refused(name):
    weight, lora_b, lora_a = merge_args(torch.float16)
    refused(
        ValueError,
        r"the merge would overflow torch\.float16.*noise scales",
        lambda: merge_lowrank_(weight, lora_b, lora_a, 0.5, **{name: (3, 1e6)}),
        weight,
    )


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")], ids=["nan", "inf"])
def test_a_non_finite_weight_is_refused_by_the_merge(bad):
    weight, lora_b, lora_a = merge_args()
    weight[3, 1] = bad
    refused(
        ValueError,
        r"weight has non-finite values \(row 3\)",
        lambda: merge_lowrank_(weight, lora_b, lora_a, 0.5),
        weight,
    )


def test_the_row_of_a_shard_is_named_by_its_global_index():
    weight, lora_b, lora_a = merge_args()
    weight[1, 0] = 60000.0
    lora_b[1].fill_(1e4)
    lora_a.fill_(1.0)
    half = weight.half()
    refused(
        ValueError,
        r"weight\[101, ",
        lambda: merge_lowrank_(half, lora_b.half(), lora_a.half(), 1.0, row_offset=100),
        half,
    )


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the exact re-check
def test_the_triton_merge_is_refused_by_the_same_rule():
    weight, lora_b, lora_a = merge_args(torch.float16)
    refused(
        ValueError,
        "the merge would overflow",
        lambda: merge_lowrank_(weight, lora_b * 100, lora_a * 100, 1e3, backend="triton"),
        weight,
    )


def test_a_merge_that_fits_next_to_the_range_is_accepted():
    """The row bound is loose by up to a factor r; rows past it are merged exactly instead."""
    weight = torch.full((2, 4), 60000.0, dtype=torch.float16)
    lora_b = torch.ones(2, 2, dtype=torch.float16)
    lora_a = torch.zeros(2, 4, dtype=torch.float16)
    lora_a[0, 0] = lora_a[1, 1] = 3000.0  # bound 66000 > 65504, largest value 63000
    merge_lowrank_(weight, lora_b, lora_a, 1.0, rounding="nearest")
    assert torch.isfinite(weight).all() and float(weight.max()) == 63008.0


def test_a_boundary_that_would_overflow_a_later_layer_merges_no_layer():
    model, optimizer = two_layers(torch.float16, lora_dtype=torch.float32)
    cascade = Cascade(model, optimizer, steps_per_cascade=2, noise_mode="off")
    trained(model, optimizer, 1, cascade)
    with torch.no_grad():
        model[2].lora_B.fill_(300.0)
        model[2].lora_A.fill_(300.0)  # slow_rate · s · Σ B A = 0.5 · 4 · 2 · 9e4 > 65504
    refused(
        ValueError,
        r"layer '2': the merge would overflow torch\.float16",
        cascade.step,
        model,
        optimizer,
        cascade,
    )


def test_a_fused_noise_that_would_overflow_after_the_merge_is_refused():
    model, optimizer = two_layers(torch.float16)
    cascade = Cascade(model, optimizer, noise_mode="fused", noise_lambda=500.0)  # scale ~ 100
    with torch.no_grad():
        model[0].weight.fill_(65504.0)  # the next noise would push it past fp16's range
    refused(
        ValueError,
        r"layer '0': the merge would overflow",
        cascade.end_epoch,
        model,
        optimizer,
        cascade,
    )


# == 4. PEFT export for any model ============================================================


def test_export_of_a_bare_layer_is_refused_before_anything_is_written(tmp_path):
    layer = LoRASCLinear(IN, OUT, r=RANK)
    optimizer = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1)
    cascade = Cascade(layer, optimizer, keep_history=True, noise_mode="off")
    trained(layer, optimizer, 1)
    cascade.end_epoch()
    refused(
        ValueError,
        "module name '': PEFT adapts named submodules only",
        lambda: cascade.export_peft_adapter(tmp_path / "adapter"),
        layer,
        cascade,
    )
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize(
    "updates, match",
    [
        ({"a": []}, r"updates\['a'\] is empty"),
        ({"a": [(torch.zeros(OUT, RANK), torch.zeros(RANK + 1, IN))]}, r"updates\['a'\]\[0\]"),
        (
            {
                "a": [
                    (torch.zeros(OUT, RANK), torch.zeros(RANK, IN)),
                    (torch.zeros(OUT + 1, RANK), torch.zeros(RANK, IN)),
                ]
            },
            r"updates\['a'\]\[1\]",
        ),
    ],
    ids=["empty", "rank-mismatch", "other-weight"],
)
def test_write_peft_adapter_refuses_malformed_updates(tmp_path, updates, match):
    refused(ValueError, match, lambda: write_peft_adapter(tmp_path / "adapter", updates), updates)
    assert not (tmp_path / "adapter").exists()


def test_exported_names_are_anchored_regexes(tmp_path):
    updates = {
        "1": [(torch.ones(OUT, RANK), torch.ones(RANK, IN))],
        "a.b+c": [(torch.ones(OUT, RANK), torch.ones(RANK, IN))],
    }
    folder = write_peft_adapter(tmp_path / "adapter", updates)
    pattern = json.loads((folder / "adapter_config.json").read_text())["target_modules"]
    assert pattern == r"^(?:1|a\.b\+c)$"


# == 5. accepted like PEFT and nn.Linear, or refused with a TypeError ========================


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dtype": torch.int32}, "dtype must be None or a floating dtype"),
        ({"dtype": torch.complex64}, "dtype must be None or a floating dtype"),
        ({"lora_dtype": torch.complex64}, "lora_dtype must be None or a floating"),
        ({"r": np.bool_(True)}, "r must be an int"),
        ({"r": True}, "r must be an int"),
        ({"lora_alpha": np.array([2.0])}, "lora_alpha must be a float"),
    ],
    ids=["int", "complex", "complex-lora", "np-bool", "bool", "np-array"],
)
def test_layer_arguments_of_the_wrong_type_are_refused(kwargs, match):
    refused(TypeError, match, lambda: LoRASCLinear(IN, OUT, **{"r": RANK, **kwargs}))


def test_from_linear_refuses_a_complex_linear():
    linear = nn.Linear(IN, OUT, dtype=torch.complex64)
    refused(TypeError, "linear.weight's dtype", lambda: LoRASCLinear.from_linear(linear), linear)


@pytest.mark.parametrize(
    "name, value, error, match",
    [
        ("x", torch.randn(3, IN, dtype=torch.complex64), TypeError, "x must have a floating"),
        ("scale", np.array([1.0, 2.0]), TypeError, "scale must be a float"),
        ("noise_seed", np.float64(3.0), TypeError, "noise_seed must be an int"),
        ("dropout_p", np.float32(1.5), ValueError, "dropout_p must be in"),
    ],
    ids=["complex-x", "array-scale", "float-seed", "np-dropout"],
)
def test_lorasc_linear_refuses_bad_scalars_and_dtypes(name, value, error, match):
    x, weight, bias = torch.randn(3, IN), torch.randn(OUT, IN), torch.randn(OUT)
    lora_a, lora_b = torch.randn(RANK, IN), torch.randn(OUT, RANK)
    arguments = {
        "x": x,
        "weight": weight,
        "bias": bias,
        "lora_A": lora_a,
        "lora_B": lora_b,
        "scale": 2.0,
        "noise_scale": 0.1 if name == "noise_seed" else 0.0,
        name: value,
    }
    refused(error, match, lambda: lorasc_linear(**arguments), weight, lora_a, lora_b)


@pytest.mark.parametrize(
    "name, value, error, match",
    [
        ("weight", torch.randn(OUT, IN, dtype=torch.complex64), TypeError, "weight must have"),
        ("coeff", np.array(0.5), TypeError, "coeff must be a float"),
        ("seed", np.float32(1.0), TypeError, "seed must be an int"),
        ("row_offset", np.int64(-1), ValueError, "row_offset must be >= 0"),
    ],
    ids=["complex-weight", "array-coeff", "float-seed", "negative-offset"],
)
def test_merge_refuses_bad_scalars_and_dtypes(name, value, error, match):
    weight, lora_b, lora_a = merge_args()
    arguments = {"weight": weight, "lora_B": lora_b, "lora_A": lora_a, "coeff": 0.5, name: value}
    refused(error, match, lambda: merge_lowrank_(**arguments), weight, lora_b, lora_a)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"steps_per_cascade": np.int64(0)}, ValueError, "steps_per_cascade must be >= 1"),
        ({"slow_rate": np.float32(1.5)}, ValueError, "slow_rate"),
        ({"seed": np.float64(1.0)}, TypeError, "seed must be an int"),
    ],
    ids=["np-steps", "np-slow-rate", "float-seed"],
)
def test_cascade_settings_of_numpy_type_are_checked_like_python_numbers(kwargs, error, match):
    model, optimizer = two_layers()
    refused(error, match, lambda: Cascade(model, optimizer, **kwargs), model, optimizer)


def test_numpy_scalars_work_where_python_numbers_do():
    layer = LoRASCLinear(
        np.int64(IN),
        np.int32(OUT),
        r=np.int64(RANK),
        lora_alpha=np.float32(4.0),
        lora_dropout=np.float64(0.0),
    )
    assert (layer.r, layer.scaling) == (RANK, 2.0) and type(layer.r) is int
    weight, lora_b, lora_a = merge_args()
    expected = merge_lowrank_(weight.clone(), lora_b, lora_a, 0.5, seed=3)
    assert torch.equal(
        merge_lowrank_(
            weight, lora_b, lora_a, np.float32(0.5), seed=np.uint32(3), row_offset=np.int64(0)
        ),
        expected,
    )
    x = torch.randn(3, IN)
    assert torch.equal(
        lorasc_linear(x, weight, None, lora_a, lora_b, np.float64(2.0)),
        lorasc_linear(x, weight, None, lora_a, lora_b, 2.0),
    )
    config = LoRASCConfig(r=np.int64(RANK), lora_alpha=np.float32(4))
    assert type(config.r) is int
    model, optimizer = two_layers()
    cascade = Cascade(model, optimizer, steps_per_cascade=np.int64(2), slow_rate=np.float32(0.5))
    trained(model, optimizer, 2, cascade)
    assert cascade.cascade_index == 1
    buffer = io.BytesIO()  # the settings are Python numbers: a checkpoint loads weights-only
    torch.save(cascade.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["settings"]["steps_per_cascade"] == 2


@pytest.mark.parametrize(
    "noise, dropout",
    [(False, 0.0), (True, 0.0), (False, 0.25)],
    ids=["plain", "fused-noise", "dropout"],
)
def test_a_forward_on_the_meta_device_gives_shapes(noise, dropout):
    with torch.device("meta"):
        layer = LoRASCLinear(IN, OUT, r=RANK, lora_dropout=dropout)
    if noise:
        layer.set_noise(5, 0.1)
    y = layer(torch.empty(2, 3, IN, device="meta"))
    assert y.is_meta and y.shape == (2, 3, OUT)
    inject_lorasc(nn.Sequential(nn.Linear(IN, OUT, device="meta")), LoRASCConfig(r=RANK))


def test_double_backward_on_the_torch_backend_matches_float64_gradgradcheck():
    inputs = [
        torch.randn(3, IN, dtype=torch.float64, requires_grad=True),
        torch.randn(OUT, IN, dtype=torch.float64, requires_grad=True),
        torch.randn(OUT, dtype=torch.float64, requires_grad=True),
        torch.randn(RANK, IN, dtype=torch.float64, requires_grad=True),
        torch.randn(OUT, RANK, dtype=torch.float64, requires_grad=True),
    ]
    for kwargs in (
        {},
        {"noise_seed": 3, "noise_scale": 0.2},
        {"dropout_p": 0.3, "dropout_seed": 9},
    ):

        def linear(*tensors, kwargs=kwargs):
            return lorasc_linear(*tensors, 1.5, backend="torch", **kwargs)

        assert torch.autograd.gradgradcheck(linear, inputs)


def test_a_gradient_penalty_through_a_triton_layer_matches_the_torch_layer():
    grads = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(3)
        layer = LoRASCLinear(IN, OUT, r=RANK, backend=backend)
        with torch.no_grad():
            layer.lora_B.normal_()
        x = torch.randn(4, IN, requires_grad=True)
        (dx,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
        dx.pow(2).sum().backward()
        grads[backend] = layer.lora_B.grad
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-3, atol=1e-4)


# -- the Trainer callback (its events called as a Trainer would) ------------------------------


def callback_and_run(tmp_path, global_step=0, **settings):
    """A LoRASCCallback, a model and optimizer, and Trainer-like ``args``/``state``."""
    hf_callback = pytest.importorskip("lorasc_kernels.integrations.hf_callback")
    model, optimizer = two_layers()
    args, state = trainer_args_and_state(tmp_path, global_step)
    return hf_callback, hf_callback.LoRASCCallback(**settings), model, optimizer, args, state


@pytest.mark.parametrize("event", ["on_optimizer_step", "on_epoch_end", "on_save"])
def test_callback_events_before_training_say_so(tmp_path, event):
    _, callback, model, optimizer, args, state = callback_and_run(tmp_path)
    refused(
        RuntimeError,
        "LoRASCCallback has no Cascade yet",
        lambda: getattr(callback, event)(args, state, None),
        model,
        optimizer,
    )
    assert not callback.started


def test_callback_without_model_or_optimizer_is_refused(tmp_path):
    _, callback, model, optimizer, args, state = callback_and_run(tmp_path)
    refused(
        RuntimeError,
        "no model or optimizer",
        lambda: callback.on_train_begin(args, state, None, model=model, optimizer=None),
        model,
        optimizer,
    )


def test_callback_refuses_a_second_train_on_another_model(tmp_path):
    _, callback, model, optimizer, args, state = callback_and_run(tmp_path)
    callback.on_train_begin(args, state, None, model=model, optimizer=optimizer)
    other, other_optimizer = two_layers()
    refused(
        RuntimeError,
        "another model",
        lambda: callback.on_train_begin(args, state, None, model=other, optimizer=other_optimizer),
        model,
        optimizer,
        callback.cascade,
        other,
        other_optimizer,
    )
    replacement = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    callback.on_train_begin(args, state, None, model=model, optimizer=replacement)
    assert callback.cascade.optimizer is replacement  # a rebuilt optimizer is handed over


def test_callback_refuses_a_second_train_after_finalize(tmp_path):
    _, callback, model, optimizer, args, state = callback_and_run(tmp_path)
    callback.on_train_begin(args, state, None, model=model, optimizer=optimizer)
    callback.cascade.finalize()
    refused(
        RuntimeError,
        "was finalized",
        lambda: callback.on_train_begin(args, state, None, model=model, optimizer=optimizer),
        model,
        optimizer,
    )


def test_callback_resume_without_or_with_a_malformed_checkpoint_is_refused(tmp_path):
    hf_callback, callback, model, optimizer, args, state = callback_and_run(tmp_path, 6)

    def begin():
        callback.on_train_begin(args, state, None, model=model, optimizer=optimizer)

    refused(RuntimeError, "checkpoint-6", begin, model, optimizer)
    folder = tmp_path / "checkpoint-6"
    folder.mkdir()
    torch.save({"cascade_index": 1}, folder / hf_callback.CHECKPOINT_FILE)
    refused(
        ValueError,
        r"checkpoint-6/lorasc_cascade.pt: state must be a dict .* its 'settings'",
        begin,
        model,
        optimizer,
    )
    assert not callback.started


def test_finalize_refuses_a_model_whose_layer_was_swapped_out():
    model, optimizer = two_layers()
    cascade = Cascade(model, optimizer)
    model[2] = nn.Linear(HIDDEN, OUT)
    refused(
        RuntimeError,
        r"finalize\(\): the model no longer holds the layer '2' this Cascade drives",
        cascade.finalize,
        model,
        optimizer,
        cascade,
    )


# -- FSDP2: a refusal on the rank holding the bad rows stops every rank -----------------------


def _fsdp_refusal_rank(rank, world, port, out_dir):
    """One rank: a 4-row layer sharded 2 + 2; rank 1's rows of B overflow the merge."""
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        layer = LoRASCLinear(IN, 4, r=RANK)
        fully_shard(layer)
        optimizer = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1)
        cascade = Cascade(layer, optimizer, noise_mode="off")
        with torch.no_grad():
            layer.lora_A.to_local().fill_(1e10)
            layer.lora_B.to_local().fill_(1e30 if rank == 1 else 1e-3)
        before = _snap([layer, optimizer, cascade])
        try:
            cascade.end_epoch()
            message = ""
        except ValueError as error:
            message = str(error)
        torch.save(
            {"message": message, "unchanged": _snap([layer, optimizer, cascade]) == before},
            f"{out_dir}/rank{rank}.pt",
        )
        dist.barrier()  # both ranks done before either tears gloo down (an exit race aborts)
    finally:
        dist.destroy_process_group()


def test_under_fsdp2_every_rank_refuses_when_one_rank_holds_the_bad_rows(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    try:
        mp.spawn(_fsdp_refusal_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    except mp.ProcessExitedException:
        # gloo can abort a rank while it is torn down, after the results are written: what
        # is tested is in the files; without them, the failure is the test's
        if not all((tmp_path / f"rank{rank}.pt").exists() for rank in range(2)):
            raise
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert "another rank refused this merge" in results[0]["message"]
    assert "layer '' (the model itself): the merge would overflow" in results[1]["message"]
    assert all(result["unchanged"] for result in results)


def test_a_failed_adapter_write_leaves_the_previous_adapter(tmp_path, monkeypatch):
    updates = {"a": [(torch.ones(OUT, RANK), torch.ones(RANK, IN))]}
    folder = write_peft_adapter(tmp_path / "adapter", updates)
    files = {path.name: path.read_bytes() for path in folder.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("lorasc_kernels.integrations.peft_adapter.write_safetensors", full_disk)
    other = {"a": [(2 * torch.ones(OUT, RANK), torch.ones(RANK, IN))]}
    refused(OSError, "No space left", lambda: write_peft_adapter(folder, other), updates)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == files
