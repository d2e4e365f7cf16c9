"""Fine-tuning recipe: config, data, schedules, metrics and the :class:`Trainer`."""

from core.training.checkpoint import CheckpointError
from core.training.config import TrainingConfig, parse_training_config
from core.training.data import ClassificationExample, PreferenceExample, coerce_examples
from core.training.trainer import ProgressEvent, Trainer, TrainerCallbacks, TrainResult

__all__ = [
    "CheckpointError",
    "ClassificationExample",
    "PreferenceExample",
    "ProgressEvent",
    "TrainResult",
    "Trainer",
    "TrainerCallbacks",
    "TrainingConfig",
    "coerce_examples",
    "parse_training_config",
]
