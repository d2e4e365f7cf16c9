"""LoRA (Hu et al. 2021).

Only the torch-free config is exported here, so that reading it does not import torch; the
tensors live in ``layer`` and ``model`` (import those submodules).
"""

from core.methods.lora.config import LoraConfig

__all__ = ["LoraConfig"]
