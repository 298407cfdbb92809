"""What a Cascade reports per boundary (last_boundary), and the warning of a forgotten step."""

import logging
import math

import pytest
import torch
from torch import nn

from lorasc_kernels import Cascade, LoRASCConfig, LoRASCLinear, inject_lorasc
from lorasc_kernels.cascade.lowrank import effective_rank, lowrank_svd, stacked, truncated

IN, HIDDEN, OUT = 24, 20, 6


def erank64(matrix: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank of a dense matrix, all in float64."""
    s = torch.linalg.svdvals(matrix.double())
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def test_effective_rank_of_known_spectra():
    assert effective_rank(torch.ones(5)) == pytest.approx(5.0, rel=1e-12)
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(4)) == 0.0
    s = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    p = s / 8
    assert effective_rank(s) == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-12)


def test_lowrank_svd_and_truncation_match_float64_on_the_dense_product():
    torch.manual_seed(0)
    pairs = [(torch.randn(30, 3), torch.randn(3, 17)) for _ in range(4)]  # R = 12
    lora_b, lora_a = stacked(pairs)
    dense = sum(b.double() @ a.double() for b, a in pairs)
    s_dense = torch.linalg.svdvals(dense)
    u, s, vh = lowrank_svd(lora_b, lora_a)
    torch.testing.assert_close(s, s_dense[:12], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, dense, rtol=1e-10, atol=1e-10)
    assert effective_rank(s) == pytest.approx(erank64(dense), rel=1e-9)
    b5, a5, error = truncated(lora_b, lora_a, 5)
    assert b5.shape == (30, 5) and a5.shape == (5, 17) and b5.dtype == torch.float32
    best = torch.linalg.norm(s_dense[5:]) / torch.linalg.norm(s_dense)
    assert error == pytest.approx(float(best), rel=1e-9)
    actual = float(torch.linalg.norm(dense - b5.double() @ a5.double()) / torch.linalg.norm(dense))
    assert actual == pytest.approx(error, rel=1e-5)
    assert truncated(lora_b, lora_a, 40)[2] == 0.0


def mlp():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))
    inject_lorasc(model, LoRASCConfig(r=3, lora_alpha=6))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    return model, optimizer


def optimizer_step(model, optimizer, x):
    model(x).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def train(model, optimizer, cascade, steps, x):
    for _ in range(steps):
        optimizer_step(model, optimizer, x)
        cascade.step()


@pytest.mark.parametrize("keep_history", [False, True])
def test_last_boundary_reports_the_merged_update_against_float64(keep_history):
    model, optimizer = mlp()
    cascade = Cascade(
        model,
        optimizer,
        steps_per_cascade=3,
        slow_rate=0.5,
        noise_mode="off",
        rounding="nearest",
        keep_history=keep_history,
    )
    cascade.track_metrics(every=1)
    assert cascade.last_boundary == {}
    x = torch.randn(16, IN)
    layer = model[0]
    accumulated = torch.zeros(HIDDEN, IN, dtype=torch.float64)
    for t in range(3):
        train(model, optimizer, cascade, 2, x)
        optimizer_step(model, optimizer, x)
        w_before = layer.weight.detach().double().clone()
        delta = (
            0.5 * layer.scaling * layer.lora_B.detach().double() @ layer.lora_A.detach().double()
        )
        accumulated += delta
        assert cascade.step()
        figures = cascade.last_boundary
        assert figures["lorasc/cascade"] == t and figures["lorasc/merge_ms"] > 0
        assert figures["lorasc/update_ratio"] == pytest.approx(
            float(delta.norm() / w_before.norm()), rel=1e-6
        )
        assert figures["lorasc/cascade_effective_rank"] == pytest.approx(erank64(delta), rel=1e-9)
        if keep_history:
            assert figures["lorasc/effective_rank"] == pytest.approx(erank64(accumulated), rel=1e-6)
        else:
            assert "lorasc/effective_rank" not in figures
    if keep_history:  # the accumulated update outgrows one cascade's rank
        assert cascade.last_boundary["lorasc/effective_rank"] > 3


def test_track_metrics_every_k_boundaries_on_a_named_layer():
    model, optimizer = mlp()
    cascade = Cascade(model, optimizer, steps_per_cascade=1, noise_mode="off")
    cascade.track_metrics(every=2, layer="2")
    x = torch.randn(8, IN)
    measured = []
    for _ in range(4):
        optimizer_step(model, optimizer, x)
        w_before = model[2].weight.detach().double().clone()
        delta = (
            model[2].scaling * model[2].lora_B.detach().double() @ model[2].lora_A.detach().double()
        )
        assert cascade.step()
        measured.append("lorasc/update_ratio" in cascade.last_boundary)
        if measured[-1]:
            assert cascade.last_boundary["lorasc/update_ratio"] == pytest.approx(
                float(delta.norm() / w_before.norm()), rel=1e-6
            )
    assert measured == [True, False, True, False]
    cascade.track_metrics(every=0)
    train(model, optimizer, cascade, 1, x)
    assert set(cascade.last_boundary) == {"lorasc/cascade", "lorasc/merge_ms"}
    with pytest.raises(ValueError, match="not one of the Cascade's LoRASCLinear layers"):
        cascade.track_metrics(layer="1")
    with pytest.raises(ValueError, match="every"):
        cascade.track_metrics(every=-1)


def test_fp8_layer_ratio_uses_the_dequantized_weight():
    torch.manual_seed(2)
    layer = LoRASCLinear(IN, OUT, r=2, weight_format="fp8_e4m3", backend="torch")
    optimizer = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=3e-2)
    cascade = Cascade(nn.Sequential(layer), optimizer, steps_per_cascade=1, noise_mode="off")
    dequantized = layer.weight.detach().double() * layer.weight_scale.double()[:, None]
    layer(torch.randn(8, IN)).pow(2).mean().backward()
    optimizer.step()
    delta = layer.scaling * layer.lora_B.detach().double() @ layer.lora_A.detach().double()
    cascade.step()
    assert cascade.last_boundary["lorasc/update_ratio"] == pytest.approx(
        float(delta.norm() / dequantized.norm()), rel=1e-6
    )


def test_a_boundary_with_untouched_fast_loras_warns_once(caplog):
    model, optimizer = mlp()
    cascade = Cascade(model, optimizer, steps_per_cascade=2, noise_mode="off")
    x = torch.randn(8, IN)
    with caplog.at_level(logging.WARNING, logger="lorasc_kernels"):
        for _ in range(2):  # optimizer.step() forgotten
            model(x).pow(2).mean().backward()
            optimizer.zero_grad()
            cascade.step()
    warnings = [r for r in caplog.records if "no optimizer step changed them" in r.message]
    assert len(warnings) == 1 and "cascade 0" in warnings[0].message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lorasc_kernels"):
        train(model, optimizer, cascade, 2, x)
        cascade.finalize()  # right after a boundary: nothing to merge, no warning
    assert not [r for r in caplog.records if "no optimizer step" in r.message]
