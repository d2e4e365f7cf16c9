from core.methods.feature_extraction.config import FeatureExtractionConfig
from core.methods.feature_extraction.model import FeatureExtractionModel

__all__ = ["FeatureExtractionConfig", "FeatureExtractionModel"]
