"""Fine-tuning recipe: the :class:`~core.training.trainer.Trainer` and the ideas it uses.

- ``trainer``: the recipe (setup / train / save_checkpoint / resume); start reading here.
- ``config``: every training setting, with its range, default and description.
- ``inputs``: configs and rows from the caller, coerced and checked (ConfigError, DataError).
- ``data``: examples, tokenization, validation split, length-bucketed batches.
- ``schedules``: learning-rate schedules, layer-wise decay, gradual unfreezing.
- ``metrics``: losses, evaluation metrics, which evaluation is better.
- ``state``: what changes while training, and how a checkpoint saves it.
- ``rng``: the run's own random streams (why resuming is bit-exact).
- ``checkpoint``: the checkpoint bytes (JSON + safetensors, never pickle).
- ``callbacks``: what the caller is told (progress events, callbacks, the result).

Import the submodules: this package imports nothing itself, so that reading
:mod:`core.training.config` does not import torch.
"""
