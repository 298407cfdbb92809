"""The run-wide effective rank kept incrementally (lowrank.LowRankSum) against the SVD of
the dense sum in float64, and what a Cascade reports with it."""

import math

import pytest
import torch
from torch import nn

from lorasc_kernels import Cascade, LoRASCConfig, inject_lorasc
from lorasc_kernels.cascade.lowrank import LowRankSum, effective_rank, lowrank_svd, stacked
from lorasc_kernels.cascade.metrics import DEFAULT_EVERY

# Singular values agree with the dense float64 SVD to this tolerance, relative to the largest.
TOLERANCE = 1e-10


def dense_singular_values(pairs) -> torch.Tensor:
    return torch.linalg.svdvals(sum(b.double() @ a.double() for b, a in pairs))


def check_against_dense(total: LowRankSum, pairs) -> None:
    expected = dense_singular_values(pairs)
    got = total.singular_values()
    k = min(got.numel(), expected.numel())
    scale = float(expected[0])
    assert float((got[:k] - expected[:k]).abs().max()) <= TOLERANCE * scale
    for rest in (expected[k:], got[k:]):  # what one side has beyond the other: zeros
        assert float(rest.abs().sum()) <= TOLERANCE * scale * rest.numel()
    assert effective_rank(got) == pytest.approx(effective_rank(expected), rel=1e-9)


@pytest.mark.parametrize(("n", "k"), [(40, 30), (9, 25), (25, 7)])
def test_sum_matches_dense_svd_while_growing_and_saturated(n, k):
    """Through ranks below N and K, and past them (the bases saturate at N and K)."""
    torch.manual_seed(0)
    total, pairs = LowRankSum(), []
    for t in range(12):  # r = 3: R = 36 outgrows min(N, K) in the small cases
        pair = (torch.randn(n, 3) * 0.7**t, torch.randn(3, k))
        pairs.append(pair)
        total.add(*pair)
        check_against_dense(total, pairs)
    assert total.count == 12
    assert total.basis_b.shape[1] <= n and total.basis_a.shape[1] <= k
    orthogonality = total.basis_b.T @ total.basis_b - torch.eye(total.basis_b.shape[1]).double()
    assert float(orthogonality.abs().max()) < 1e-12


def test_sum_of_repeated_and_zero_directions_does_not_grow_the_bases():
    torch.manual_seed(1)
    b, a = torch.randn(20, 2), torch.randn(2, 15)
    pairs = [
        (b, a),
        (2 * b, a),
        (torch.zeros(20, 2), torch.randn(2, 15)),
        (b[:, :1] @ torch.ones(1, 2), a),
    ]
    total = LowRankSum()
    for pair in pairs:
        total.add(*pair)
    check_against_dense(total, pairs)
    assert total.basis_b.shape[1] == 2  # span(B) never exceeds b's two columns
    assert LowRankSum().singular_values().numel() == 0


def test_sum_equals_the_stacked_svd_it_replaces():
    torch.manual_seed(2)
    pairs = [(torch.randn(30, 4), torch.randn(4, 18)) for _ in range(5)]
    total = LowRankSum()
    for pair in pairs:
        total.add(*pair)
    stacked_values = lowrank_svd(*stacked(pairs))[1]
    torch.testing.assert_close(
        total.singular_values(), stacked_values, rtol=0, atol=TOLERANCE * float(stacked_values[0])
    )


def mlp():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 5))
    inject_lorasc(model, LoRASCConfig(r=2, lora_alpha=4))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    return model, optimizer


def run(cascade, model, optimizer, boundaries):
    x = torch.randn(8, 12)
    figures = []
    for _ in range(boundaries):
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        assert cascade.step()
        figures.append(cascade.last_boundary)
    return figures


def test_cascade_reports_the_dense_rank_of_the_history_at_each_measured_boundary():
    """Measured every 3rd boundary: the entries of the unmeasured ones are added later."""
    model, optimizer = mlp()
    cascade = Cascade(model, optimizer, steps_per_cascade=1, noise_mode="off", keep_history=True)
    cascade.track_metrics(every=3, layer="2")
    figures = run(cascade, model, optimizer, 8)
    for t, entry in enumerate(figures):
        if t % 3:
            assert "lorasc/effective_rank" not in entry
            continue
        dense = dense_singular_values(cascade.history["2"][: t + 1])
        assert entry["lorasc/effective_rank"] == pytest.approx(effective_rank(dense), rel=1e-9)
    assert figures[6]["lorasc/effective_rank"] > 2  # past one cascade's rank


def test_loaded_history_restarts_the_sum():
    model, optimizer = mlp()
    cascade = Cascade(model, optimizer, steps_per_cascade=1, noise_mode="off", keep_history=True)
    cascade.track_metrics(every=1)
    run(cascade, model, optimizer, 2)
    state = cascade.state_dict()
    scrambled = {name: [(-2 * b, a) for b, a in pairs] for name, pairs in state["history"].items()}
    cascade.load_state_dict({**state, "history": scrambled})
    figures = run(cascade, model, optimizer, 1)
    pairs = cascade.history["0"]
    assert pairs[0][0].equal(scrambled["0"][0][0])
    expected = effective_rank(dense_singular_values(pairs))
    assert figures[0]["lorasc/effective_rank"] == pytest.approx(expected, rel=1e-9)


def test_default_measures_every_tenth_boundary():
    model, optimizer = mlp()
    cascade = Cascade(model, optimizer, steps_per_cascade=1, noise_mode="off")
    measured = ["lorasc/update_ratio" in f for f in run(cascade, model, optimizer, 12)]
    assert DEFAULT_EVERY == 10
    assert measured == [t % 10 == 0 for t in range(12)]
    assert not math.isnan(cascade.last_boundary["lorasc/merge_ms"])
