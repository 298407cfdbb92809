"""Cascade.boundary_requests: the one source of a boundary's merge arguments. The boundary's
merges and the exports' (merged_state_dict, save_merged, finalize's fit check) take every
argument from it, for every driven layer type and weight format."""

import pytest
import torch
from torch import nn

from lorasc_kernels import Cascade, LoRASCConfig, inject_lorasc, merge
from lorasc_kernels.cascade import merges as cascade_merges

IN, HIDDEN = 12, 10
ARGUMENTS = ("coeff", "rounding", "seed", "noise_remove", "noise_add", "row_offset", "backend")


def base_model():
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 4))


def lorasc_model(weight_format):
    model = base_model()
    config = LoRASCConfig(
        r=2, lora_alpha=4, target_modules=["0", "2"], weight_format=weight_format, backend="torch"
    )
    inject_lorasc(model, config)
    return model


def peft_model(_):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"])
    return peft.get_peft_model(base_model(), config)


def recorder(monkeypatch, module) -> list[dict]:
    """Every ``plan_merge`` call that ``module`` makes, as its arguments by name."""
    calls, original = [], module.plan_merge

    def recording(weight, lora_b, lora_a, coeff, **kwargs):
        calls.append({"coeff": coeff, **kwargs})
        return original(weight, lora_b, lora_a, coeff, **kwargs)

    monkeypatch.setattr(module, "plan_merge", recording)
    return calls


CASES = [
    (lorasc_model, None, "inplace"),
    (lorasc_model, None, "fused"),
    (lorasc_model, None, "off"),
    (lorasc_model, "fp8_e4m3", "inplace"),
    (lorasc_model, "fp8_e5m2", "inplace"),
    (lorasc_model, "fp8_e4m3", "off"),
    (peft_model, None, "inplace"),
    (peft_model, None, "off"),
]


@pytest.mark.parametrize(("build", "weight_format", "noise_mode"), CASES)
def test_boundary_and_export_merge_with_the_same_arguments(
    monkeypatch, build, weight_format, noise_mode
):
    torch.manual_seed(0)
    model = build(weight_format)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    settings = {"noise_lambda": 0.0 if noise_mode == "off" else 0.1, "noise_mode": noise_mode}
    cascade = Cascade(model, optimizer, steps_per_cascade=2, slow_rate=0.5, seed=7, **settings)
    boundary = recorder(monkeypatch, cascade_merges)
    export = recorder(monkeypatch, merge)  # merge_lowrank_ → prepare_merge → plan_merge
    for step in range(3):  # one boundary, then a cascade halfway
        model(torch.randn(8, IN)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1:  # the boundary ending cascade 0 asks what boundary_requests says
            expected = cascade.boundary_requests()
        cascade.step()
    layers = len(cascade.layers)
    assert [call["seed"] for call in boundary[:layers]] == [r.seed for r in expected]
    assert [call["noise_add"] for call in boundary[:layers]] == [r.noise_add for r in expected]

    requests = cascade.boundary_requests(last=True)
    assert [request.name for request in requests] == list(cascade.layers)
    assert [request.layer for request in requests] == list(cascade.layers.values())
    assert all(request.noise_add is None for request in requests)
    del boundary[:], export[:]
    cascade.merged_state_dict()
    exported = list(export)
    cascade.finalize()
    fit_checks = export[len(exported) :]  # finalize's fit check of fp8 weights, then its merge
    assert len(exported) == len(boundary) == layers
    assert len(fit_checks) == (layers if weight_format else 0)
    for request, ours, theirs in zip(requests, exported, boundary, strict=True):
        assert ours == theirs, request.name  # every argument, merge for merge
        assert set(ours) == set(ARGUMENTS)
        assert ours["coeff"] == request.coeff == 0.5 * request.layer.scaling
        assert (ours["seed"], ours["noise_remove"]) == (request.seed, request.noise_remove)
        assert (ours["noise_remove"] is not None) == (noise_mode == "inplace")
    for check, theirs in zip(fit_checks, boundary, strict=False):
        assert check == theirs
