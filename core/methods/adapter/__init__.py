from core.methods.adapter.config import BottleneckConfig
from core.methods.adapter.layer import Bottleneck, BottleneckHooks
from core.methods.adapter.model import BottleneckModel

__all__ = ["Bottleneck", "BottleneckConfig", "BottleneckHooks", "BottleneckModel"]
