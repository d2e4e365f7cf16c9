"""Training from scratch.

Only the torch-free config is exported here, so that reading it does not import torch; the
tensors live in ``model`` (import those submodules).
"""

from core.methods.scratch.config import ScratchConfig

__all__ = ["ScratchConfig"]
