"""Config resolution (defaults -> recipe -> flags), validation and JSON round trips."""

from __future__ import annotations

import dataclasses

import pytest

from aivh_ens.config import RunConfig, from_dict, resolve_config, to_dict
from aivh_ens.errors import UserError
from aivh_ens.recipes import RECIPES, get_recipe


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_resolves_and_round_trips(name):
    cfg = resolve_config(name, model=None if RECIPES[name].get("model") else "test_efficientnet")
    assert cfg.recipe == name and cfg.name
    assert from_dict(to_dict(cfg)) == cfg


def test_flags_override_recipe_and_recipe_overrides_defaults():
    cfg = resolve_config("effnet-b4-adam", epochs=2, lr=None)
    assert cfg.epochs == 2  # flag
    assert cfg.lr == 5e-5 and cfg.optimizer == "adam" and cfg.scheduler == "step"  # recipe
    assert cfg.accum_steps == RunConfig().accum_steps  # default
    assert cfg.name == "efficientnet_b4-effnet-b4-adam"


def test_config_is_frozen():
    cfg = resolve_config("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"folds": 1}, "at least 2"),
        ({"optimizer": "rmsprop"}, "adam, adamw, sgd, lamb"),
        ({"epochs": 0}, "--epochs"),
        ({"name": "../escape"}, "run name"),
        ({"device": "gpu0"}, "--device"),
        ({"model": "a+b+c"}, "two joined"),
        ({"rrc_scale": (0.8, 1.2)}, "rrc_scale"),
    ],
)
def test_invalid_values_name_the_field(overrides, match):
    with pytest.raises(UserError, match=match):
        resolve_config("tiny", **overrides)


def test_unknown_recipe_lists_valid_ones():
    with pytest.raises(UserError, match="did you mean tiny") as e:
        get_recipe("tinyy")
    assert "effnet-b4-adam" in str(e.value)


def test_unknown_config_key_rejected():
    with pytest.raises(UserError, match="unknown config keys"):
        from_dict({"lr": 1.0, "learning_rate": 2.0})
