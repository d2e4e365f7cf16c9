"""Method registry: name → config class. One folder per method.

Torch-free: the configs are what the API validates and documents. The torch modules that
hold each method's tensors are imported by :func:`build_method`, on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.errors import ConfigError
from core.methods.bottleneck import BottleneckConfig
from core.methods.config import MethodConfig, parse_config
from core.methods.feature_extraction import FeatureExtractionConfig
from core.methods.full import FullConfig
from core.methods.lora import LoraConfig
from core.methods.prompt_tuning import PromptTuningConfig
from core.methods.scratch import ScratchConfig
from core.targets import BaseKind

if TYPE_CHECKING:
    from core.base import FrozenBase
    from core.decoder.base import DecoderBase
    from core.methods.method import AdapterMethod

METHODS: dict[str, type[MethodConfig]] = {
    cls.type: cls
    for cls in (
        LoraConfig,
        BottleneckConfig,
        PromptTuningConfig,
        FeatureExtractionConfig,
        FullConfig,
        ScratchConfig,
    )
}


def parse_method_config(
    method_type: str, params: dict[str, Any] | None = None, base_kind: BaseKind = "encoder"
) -> MethodConfig:
    """Validated config for ``method_type`` on a ``base_kind`` base; :class:`ConfigError` names
    the bad field."""
    if method_type not in METHODS:
        raise ConfigError("type", f"unknown method {method_type!r}; known: {sorted(METHODS)}")
    return parse_config(METHODS[method_type], params, base_kind)


def build_method(config: MethodConfig, base: FrozenBase | DecoderBase) -> AdapterMethod:
    """The trainable module for ``config`` on ``base`` (a decoder base: lora, full or
    prompt_tuning)."""
    from core.decoder.base import DecoderBase
    from core.methods.bottleneck.model import BottleneckModel
    from core.methods.feature_extraction.model import FeatureExtractionModel
    from core.methods.full.model import DecoderFullModel, FullModel
    from core.methods.lora.model import LoraModel
    from core.methods.prompt_tuning.model import DecoderPromptTuningModel, PromptTuningModel
    from core.methods.scratch.model import ScratchModel

    # Keyed by each config's own ``type``, so a method's name is written once (in its config).
    models: dict[str, type[AdapterMethod]] = {
        LoraConfig.type: LoraModel,
        BottleneckConfig.type: BottleneckModel,
        PromptTuningConfig.type: PromptTuningModel,
        FeatureExtractionConfig.type: FeatureExtractionModel,
        FullConfig.type: FullModel,
        ScratchConfig.type: ScratchModel,
    }
    if isinstance(base, DecoderBase) and config.type == FullConfig.type:
        # LoRA runs on either base; full fine-tuning owns a copy in the decoder's layout.
        return DecoderFullModel(config, base)
    if isinstance(base, DecoderBase) and config.type == PromptTuningConfig.type:
        # The decoder's forward takes the virtual tokens as its prefix embeddings.
        return DecoderPromptTuningModel(config, base)  # type: ignore[arg-type]
    return models[config.type](config, base)


__all__ = ["METHODS", "MethodConfig", "build_method", "parse_method_config"]
