"""Fine-tuning recipe: config, data, schedules, metrics and the :class:`Trainer`.

Import the submodules (``core.training.trainer``, ``core.training.config``, ...): this package
imports nothing itself, so that reading :mod:`core.training.config` does not import torch.
"""
