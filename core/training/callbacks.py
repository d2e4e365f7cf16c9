"""What the trainer tells its caller: a progress event per step, callbacks, the result.

The service worker turns these into job events, checkpoint rows and an adapter; they are the
whole contract between a run and whoever started it (see :class:`core.training.trainer.Trainer`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.adapter import Adapter
from core.training.state import EvalRecord


@dataclass(frozen=True)
class ProgressEvent:
    step: int  # optimizer steps done (1-based after the first step)
    total_steps: int
    # Epochs completed, as a float (HF Trainer's convention): 0.5 half-way through the first
    # epoch, 1.0 at its end, 3.0 when a 3-epoch job is done.
    epoch: float
    train_loss: float  # running mean of the training loss over the current epoch
    lr: float  # learning rate of the top (head) group used for this step
    val_metrics: dict[str, Any] | None  # set when this step ended with a validation
    elapsed: float  # seconds of training, including time before a resume
    step_loss: float = math.nan  # this step's loss
    # Non-padding tokens of the training examples of every step so far (OpenAI's billable
    # ``trained_tokens``: an example seen in three epochs counts three times).
    trained_tokens: int = 0
    # The task's own metrics of this step's batch, beside its loss: a chat run's
    # train_mean_token_accuracy, a DPO run's rewards/* (none for classification and reward).
    step_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainerCallbacks:
    """All optional. Called on the training thread; keep them cheap (``on_progress`` runs every
    step) and hand heavy work (database writes) to a queue if needed."""

    on_progress: Callable[[ProgressEvent], None] | None = None
    on_eval: Callable[[ProgressEvent], None] | None = None
    # Checked before every step and between evaluation / feature batches.
    should_cancel: Callable[[], bool] | None = None
    # (checkpoint bytes, step, epochs completed, metrics): every ``checkpoint_every_steps``
    # and at the end of every epoch, except after the final step (the adapter supersedes it).
    on_checkpoint: Callable[[bytes, int, float, dict[str, Any]], None] | None = None


@dataclass
class TrainResult:
    adapter: Adapter
    # val_* of the adapter's weights (the best evaluation's, or of an epoch average, whose
    # averaged_epochs says how many), train_loss, steps, best_step ...
    metrics: dict[str, Any]
    best_step: int  # the step whose weights the adapter holds (an average: the last)
    history: list[EvalRecord]  # one entry per evaluation point
    stopped_early: bool = False
    steps: int = 0
