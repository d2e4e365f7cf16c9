"""Bottleneck adapters.

Only the torch-free config is exported here, so that reading it does not import torch; the
tensors live in ``layer`` and ``model`` (import those submodules).
"""

from core.methods.adapter.config import BottleneckConfig

__all__ = ["BottleneckConfig"]
