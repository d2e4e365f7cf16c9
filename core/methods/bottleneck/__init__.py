"""Bottleneck adapters. Their method type stays ``"adapter"`` in configs, the API and stored
adapters; the folder is named for the kind of adapter, as "adapter" alone means any of them.

Only the torch-free config is exported here, so that reading it does not import torch; the
tensors live in ``layer`` and ``model`` (import those submodules).
"""

from core.methods.bottleneck.config import BottleneckConfig

__all__ = ["BottleneckConfig"]
