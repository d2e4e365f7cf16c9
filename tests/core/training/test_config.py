from __future__ import annotations

import pytest

from core.errors import ConfigError
from core.training.config import (
    DEFAULT_LEARNING_RATES,
    DEFAULT_MAX_SEQ_LENGTHS,
    TrainingConfig,
    parse_training_config,
)


def test_defaults() -> None:
    cfg = parse_training_config(None)
    assert cfg.n_epochs == 3 and cfg.batch_size == 16 and cfg.max_seq_length is None
    assert cfg.resolved_max_seq_length("classification") == 128
    assert cfg.resolved_max_seq_length("reward") == DEFAULT_MAX_SEQ_LENGTHS["reward"]
    assert TrainingConfig(max_seq_length=64).resolved_max_seq_length("reward") == 64
    assert cfg.max_grad_norm == 1.0 and cfg.validation_fraction == 0.1 and cfg.bucket_by_length
    assert cfg.layerwise_lr_decay == 1.0 and cfg.unfreeze_layers_per_epoch == 0
    assert cfg.resolved_learning_rate("lora") == DEFAULT_LEARNING_RATES["lora"]
    assert cfg.resolved_learning_rate("full") <= 5e-5
    assert cfg.resolved_warmup_steps(100) == 10  # 10 % when neither is given


def test_explicit_values_and_round_trip() -> None:
    cfg = parse_training_config(
        {"learning_rate": 3e-4, "warmup_steps": 7, "gradual_unfreezing": 2, "seed": 5}
    )
    assert cfg.resolved_learning_rate("full") == 3e-4
    assert cfg.resolved_warmup_steps(100) == 7
    assert cfg.resolved_warmup_steps(5) == 5
    assert cfg.unfreeze_layers_per_epoch == 2
    assert parse_training_config({"gradual_unfreezing": True}).unfreeze_layers_per_epoch == 1
    assert TrainingConfig(**cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"warmup_ratio": 0.1, "warmup_steps": 3}, "warmup_steps"),
        ({"lr_scheduler": "step"}, "lr_scheduler"),
        ({"layerwise_lr_decay": 1.5}, "layerwise_lr_decay"),
        ({"gradual_unfreezing": -2}, "gradual_unfreezing"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"epochs": 3}, "epochs"),
    ],
)
def test_errors_name_the_field(params: dict, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_training_config(params)
    assert e.value.field == field
