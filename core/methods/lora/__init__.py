from core.methods.lora.config import LoraConfig
from core.methods.lora.layer import LoraHooks, MergedLoraHooks
from core.methods.lora.model import LoraModel, lora_key

__all__ = [
    "LoraConfig",
    "LoraHooks",
    "LoraModel",
    "MergedLoraHooks",
    "lora_key",
]
