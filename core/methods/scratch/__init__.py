from core.methods.scratch.config import ScratchConfig
from core.methods.scratch.model import ScratchModel

__all__ = ["ScratchConfig", "ScratchModel"]
