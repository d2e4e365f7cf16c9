"""Method configs validate at the edge and name the offending field."""

from __future__ import annotations

import pytest

from core.errors import ConfigError
from core.methods import METHODS, parse_method_config

BAD_CONFIGS = [
    ("lora", {"r": 0}, "r"),
    ("lora", {"dropout": 1.0}, "dropout"),
    ("lora", {"target_modules": ["query", "attention.self.foo"]}, "target_modules"),
    ("lora", {"alpha": 0}, "alpha"),
    ("lora", {"rank": 8}, "rank"),  # extra="forbid": typos are errors, not silently ignored
    ("adapter", {"bottleneck_size": 0}, "bottleneck_size"),
    ("adapter", {"non_linearity": "sigmoid"}, "non_linearity"),
    ("adapter", {"placement": "parallel"}, "placement"),
    ("adapter", {"init_scale": 0.0}, "init_scale"),
    ("prompt_tuning", {"n_virtual_tokens": 0}, "n_virtual_tokens"),
    ("prompt_tuning", {"init": "text"}, "init_text"),
    ("prompt_tuning", {"init": "text", "init_text": "   "}, "init_text"),
    ("prompt_tuning", {"init_text": "hello"}, "init_text"),
    ("prompt_tuning", {"init": "text", "init_text": "a" * 4097}, "init_text"),
    ("feature_extraction", {"r": 8}, "r"),
    ("full", {"lr": 1e-5}, "lr"),
    ("scratch", {"x": 1}, "x"),
]


@pytest.mark.parametrize(("method", "params", "field"), BAD_CONFIGS)
def test_invalid_config_names_the_field(method: str, params: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_method_config(method, params)
    assert err.value.field == field


def test_unknown_method_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        parse_method_config("ia3", {})
    assert err.value.field == "type"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_defaults_validate_and_round_trip_through_json(method: str) -> None:
    cfg = parse_method_config(method, {})
    data = cfg.to_dict()
    assert data["type"] == method
    params = {k: v for k, v in data.items() if k != "type"}
    assert parse_method_config(method, params) == cfg


def test_lora_all_linear_and_reserved_positions() -> None:
    lora = parse_method_config("lora", {"target_modules": "all-linear"})
    assert len(lora.target_modules) == 6  # type: ignore[attr-defined]
    assert lora.reserved_positions == 0
    prompt = parse_method_config("prompt_tuning", {"n_virtual_tokens": 7})
    assert prompt.reserved_positions == 7
