"""Feature extraction (linear probe).

Only the torch-free config is exported here, so that reading it does not import torch; the
tensors live in ``model`` (import those submodules).
"""

from core.methods.feature_extraction.config import FeatureExtractionConfig

__all__ = ["FeatureExtractionConfig"]
