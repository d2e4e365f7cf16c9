"""Every float setting of a method or of training is finite: NaN and Infinity (which Python's
JSON parser reads) are refused, naming the field, on fields bounded on one side or none too."""

from __future__ import annotations

import math
from typing import Any, get_args

import pytest
from pydantic import BaseModel

from core.errors import ConfigError
from core.methods import METHODS, parse_method_config
from core.training.config import MAX_ABS_MARGIN, TrainingConfig, parse_training_config

NON_FINITE = [math.nan, math.inf, -math.inf]


def _mentions_float(tp: Any) -> bool:
    return tp is float or any(_mentions_float(arg) for arg in get_args(tp))


def _float_fields(model: type[BaseModel]) -> list[str]:
    return [name for name, info in model.model_fields.items() if _mentions_float(info.annotation)]


def _value(model: type[BaseModel], name: str, x: float) -> Any:
    # A tuple field (adam_betas) takes the value in each place.
    default = model.model_fields[name].get_default(call_default_factory=True)
    return (x,) * len(default) if isinstance(default, tuple) else x


@pytest.mark.parametrize("x", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", _float_fields(TrainingConfig))
def test_training_settings_are_finite(name: str, x: float) -> None:
    with pytest.raises(ConfigError) as err:
        parse_training_config({name: _value(TrainingConfig, name, x)})
    assert err.value.field == name


METHOD_FLOATS = [(m, name) for m, cls in METHODS.items() for name in _float_fields(cls)]


@pytest.mark.parametrize("x", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(("method", "name"), METHOD_FLOATS)
def test_method_parameters_are_finite(method: str, name: str, x: float) -> None:
    with pytest.raises(ConfigError) as err:
        parse_method_config(method, {name: x})
    assert err.value.field == name


def test_the_unbounded_settings_are_among_those_checked() -> None:
    # The ones no range refused: margin (no bound), Infinity past a lower bound alone.
    assert {"margin", "adam_epsilon", "max_grad_norm", "center_rewards_coefficient"} <= set(
        _float_fields(TrainingConfig)
    )
    assert ("lora", "alpha") in METHOD_FLOATS


def test_finite_values_still_pass() -> None:
    config = parse_training_config({"margin": -1.5, "adam_epsilon": 1e300, "max_grad_norm": 0})
    assert config.margin == -1.5
    assert parse_method_config("lora", {"alpha": 1e6}).to_dict()["alpha"] == 1e6


@pytest.mark.parametrize("margin", [1e300, -1e300, MAX_ABS_MARGIN * 1.001])
def test_a_margin_past_what_float32_holds_usefully_is_refused(margin: float) -> None:
    """1e300 is finite, and infinite in the float32 loss: a row's own margin has the same bound
    (service.datasets.rows)."""
    with pytest.raises(ConfigError) as err:
        parse_training_config({"margin": margin})
    assert err.value.field == "margin"
    assert parse_training_config({"margin": -MAX_ABS_MARGIN}).margin == -MAX_ABS_MARGIN
