from core.methods.full.config import FullConfig
from core.methods.full.model import FullModel

__all__ = ["FullConfig", "FullModel"]
