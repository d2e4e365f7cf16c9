"""Method registry: name → (config class, module class). One folder per method."""

from __future__ import annotations

from typing import Any

from core.base import BaseModel
from core.errors import ConfigError
from core.methods.adapter import BottleneckConfig, BottleneckModel
from core.methods.base import AdapterMethod, MethodConfig, parse_config
from core.methods.feature_extraction import FeatureExtractionConfig, FeatureExtractionModel
from core.methods.full import FullConfig, FullModel
from core.methods.lora import LoraConfig, LoraModel
from core.methods.prompt_tuning import PromptTuningConfig, PromptTuningModel
from core.methods.scratch import ScratchConfig, ScratchModel

METHODS: dict[str, tuple[type[MethodConfig], type[AdapterMethod]]] = {
    "lora": (LoraConfig, LoraModel),
    "adapter": (BottleneckConfig, BottleneckModel),
    "prompt_tuning": (PromptTuningConfig, PromptTuningModel),
    "feature_extraction": (FeatureExtractionConfig, FeatureExtractionModel),
    "full": (FullConfig, FullModel),
    "scratch": (ScratchConfig, ScratchModel),
}


def parse_method_config(method_type: str, params: dict[str, Any] | None = None) -> MethodConfig:
    """Validated config for ``method_type``; :class:`ConfigError` names the bad field."""
    if method_type not in METHODS:
        raise ConfigError("type", f"unknown method {method_type!r}; known: {sorted(METHODS)}")
    return parse_config(METHODS[method_type][0], params)


def build_method(config: MethodConfig, base: BaseModel) -> AdapterMethod:
    return METHODS[config.type][1](config, base)


__all__ = ["METHODS", "AdapterMethod", "MethodConfig", "build_method", "parse_method_config"]
