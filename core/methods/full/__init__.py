"""Full fine-tuning.

Only the torch-free config is exported here, so that reading it does not import torch; the
tensors live in ``model`` (import those submodules).
"""

from core.methods.full.config import FullConfig

__all__ = ["FullConfig"]
