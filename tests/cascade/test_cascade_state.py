"""The Cascade's saved state across versions, and its settings given once."""

import copy
from pathlib import Path

import pytest
import torch

from lorasc_kernels import Cascade, CascadeSettings
from lorasc_kernels.cascade.state import STATE_KEYS, STATE_VERSION
from tests.fixtures.make_cascade_checkpoint import SETTINGS, build, train

CHECKPOINT = Path(__file__).parent.parent / "fixtures" / "cascade_checkpoint_unversioned.pt"


def _saved():
    return torch.load(CHECKPOINT, weights_only=True)


# The fixture's state as version 1 writes it, every setting spelled out here (not filled in
# by the code under test): the reference a state from before versions must continue like.
SETTINGS_V1 = dict(
    steps_per_cascade=3,
    slow_rate=0.5,
    noise_lambda=0.1,
    noise_mode="inplace",
    seed=11,
    keep_history=True,
    rounding="stochastic",
    slow_other_params=True,
    warmup_steps=0,
)


def _continued(saved: dict, state: dict, route: str) -> dict:
    """The model's state three steps after resuming from ``saved`` with the Cascade state
    ``state``, by ``route``: ``from_state_dict`` (weights first, as a Trainer resumes) or
    ``build_then_load`` (the Cascade first, then every state)."""
    saved, state = copy.deepcopy((saved, state))  # the optimizer takes its state's tensors
    model, optimizer, x = build()
    if route == "from_state_dict":
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        cascade = Cascade.from_state_dict(model, optimizer, state)
    else:
        cascade = Cascade(model, optimizer, **SETTINGS)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        cascade.load_state_dict(state)
    assert (cascade.cascade_index, cascade.steps_in_cascade) == (2, 1)
    train(model, optimizer, cascade, x, 3)
    assert (cascade.cascade_index, cascade.steps_in_cascade) == (3, 1)
    assert cascade.state_dict()["version"] == STATE_VERSION
    return model.state_dict()


def _expected(saved: dict) -> dict:
    """Where the run stands three steps later, computed on this machine from the fixture's
    weights and optimizer through the versioned route (``version`` and settings written out
    by hand above, not upgraded by the code under test).

    Why not a stored result: float32 matmuls give other last bits on another CPU, and
    Adam's first steps after a boundary turn a last-bit change into a change of ``lr``
    (an update's sign), so no result stored on one machine can be compared bit for bit, or
    to a tight tolerance, on every machine. This one is computed where the test runs, and
    compared bit for bit."""
    state = dict(saved["cascade"], version=1, settings=SETTINGS_V1)
    return _continued(saved, state, "build_then_load")


def _differing(state: dict, expected: dict) -> list[str]:
    assert set(state) == set(expected)
    return [key for key, value in state.items() if not torch.equal(value, expected[key])]


def test_the_fixture_predates_versions():
    assert "version" not in _saved()["cascade"]


@pytest.mark.parametrize("route", ["from_state_dict", "build_then_load"])
def test_a_checkpoint_from_before_versions_continues_the_run(route):
    saved = _saved()
    assert _differing(_continued(saved, saved["cascade"], route), _expected(saved)) == []


def test_the_continuation_check_fails_on_a_perturbed_fixture():
    """The check above can fail: a state from before versions whose seed is off by one
    continues another run (the next noise differs), and is refused on the route that
    builds the Cascade from the right settings first."""
    saved = _saved()
    cascade = saved["cascade"]
    perturbed = dict(cascade, settings=dict(cascade["settings"], seed=12))
    assert "0.weight" in _differing(
        _continued(saved, perturbed, "from_state_dict"), _expected(saved)
    )
    with pytest.raises(ValueError, match=r"state\['settings'\].*differ"):
        _continued(saved, perturbed, "build_then_load")


def test_a_setting_missing_from_a_state_takes_its_default():
    saved = _saved()
    state = dict(saved["cascade"], settings=dict(saved["cascade"]["settings"]))
    del state["settings"]["warmup_steps"]  # as if written before that setting existed
    model, optimizer, _ = build()
    model.load_state_dict(saved["model"])
    cascade = Cascade.from_state_dict(model, optimizer, state)
    assert cascade.settings.warmup_steps == CascadeSettings().warmup_steps


def test_a_state_of_a_newer_version_is_refused():
    model, optimizer, _ = build()
    cascade = Cascade(model, optimizer, **SETTINGS)
    state = dict(cascade.state_dict(), version=STATE_VERSION + 1)
    with pytest.raises(ValueError, match=r"state\['version'\] is 2: written by a newer"):
        cascade.load_state_dict(state)
    with pytest.raises(ValueError, match=r"state\['version'\] must be an int >= 0"):
        cascade.load_state_dict(dict(state, version="1"))


def test_an_unknown_setting_in_a_state_is_refused_by_name():
    saved = _saved()
    state = dict(saved["cascade"], settings=dict(saved["cascade"]["settings"], speed=2))
    model, optimizer, _ = build()
    with pytest.raises(TypeError, match=r"state\['settings'\].*speed"):
        Cascade.from_state_dict(model, optimizer, state)


def test_state_dict_writes_every_key_once_with_the_version():
    model, optimizer, _ = build()
    state = Cascade(model, optimizer, **SETTINGS).state_dict()
    assert tuple(state) == STATE_KEYS and state["version"] == STATE_VERSION


def test_settings_are_given_once_and_overridden_by_name():
    settings = CascadeSettings(steps_per_cascade=3, slow_rate=0.5, seed=4)
    model, optimizer, _ = build()
    cascade = Cascade(model, optimizer, settings=settings, seed=9)
    assert cascade.settings == CascadeSettings(steps_per_cascade=3, slow_rate=0.5, seed=9)
    assert settings.seed == 4  # the given settings are not changed


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"speed": 2}, TypeError, r"unknown Cascade settings \['speed'\]"),
        ({"settings": {"slow_rate": 0.5}}, TypeError, "settings must be a CascadeSettings or None"),
        ({"slow_rate": 0.0}, ValueError, r"slow_rate must be in \(0, 1\]"),
    ],
    ids=["unknown", "dict", "bad-value"],
)
def test_bad_settings_are_refused_by_name(kwargs, error, match):
    model, optimizer, _ = build()
    with pytest.raises(error, match=match):
        Cascade(model, optimizer, **kwargs)
    Cascade(model, optimizer)  # the refused one claimed nothing
