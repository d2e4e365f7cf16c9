"""Soft prompt tuning.

Only the torch-free config is exported here, so that reading it does not import torch; the
tensors live in ``layer`` and ``model`` (import those submodules).
"""

from core.methods.prompt_tuning.config import PromptTuningConfig

__all__ = ["PromptTuningConfig"]
