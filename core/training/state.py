"""What changes while a job trains, saved in its checkpoints and restored on resume.

A checkpoint's JSON keeps this state in two sections: ``position`` (where the next step
starts) and ``state`` (running loss, best evaluation, early stopping, history). Each field of
:class:`TrainingState` declares its section, key and how it is read back, and
:meth:`~TrainingState.to_json` / :meth:`~TrainingState.from_json` are one loop over that list,
so saving and loading cannot drift apart when a field is added.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, NotRequired, TypedDict

from core.training.metrics import is_better


class PendingStep(TypedDict):
    """A step taken whose bookkeeping (validation, callbacks, checkpoint) is not done yet."""

    epoch: float  # epochs completed after this step
    end_of_epoch: bool
    train_loss: float  # running mean of the epoch's losses, this step included
    lr: float  # learning rate of the top (head) group this step used
    loss: float  # this step's loss
    metrics: NotRequired[dict[str, float]]  # the task's step metrics (ProgressEvent's)


class EvalRecord(TypedDict):
    """One entry of the history: a point where the run was evaluated (or would have been)."""

    step: int
    epoch: float
    train_loss: float
    lr: float
    val: dict[str, Any] | None  # validation metrics; None when the job has no validation set
    elapsed: float  # seconds of training by then


def _as_is(value: Any) -> Any:
    return value


def _saved(
    read: Callable[[Any], Any] = _as_is,
    *,
    section: str = "state",
    key: str | None = None,
    optional: bool = False,
) -> dict[str, Any]:
    """Field metadata: saved at ``meta[section][key or the field's name]``, loaded as
    ``read(value)``. ``optional``: checkpoints written before the field existed lack it; they
    load the field's default."""
    return {"section": section, "key": key, "read": read, "optional": optional}


@dataclass
class TrainingState:
    """Everything that changes while training (and goes into a checkpoint).

    Field order is the order of the keys in a checkpoint's JSON.
    """

    # Where the next step starts: optimizer steps done, the 0-based epoch it belongs to and
    # its batch within that epoch (normalised to (epoch + 1, 0) after an epoch's last batch).
    step: int = field(default=0, metadata=_saved(int, section="position"))
    epoch: int = field(default=0, metadata=_saved(int, section="position"))
    batch_in_epoch: int = field(default=0, metadata=_saved(int, section="position", key="batch"))
    # The current epoch's losses, for the running mean a progress event reports.
    loss_sum: float = field(default=0.0, metadata=_saved(float))
    loss_count: int = field(default=0, metadata=_saved(int))
    # Non-padding tokens of every step's examples (OpenAI's billable ``trained_tokens``).
    trained_tokens: int = field(default=0, metadata=_saved(int, optional=True))
    # The best evaluation so far: its metric_for_best, step (whose weights are the result)
    # and metrics; bad_evals counts the evaluations since without improvement.
    best_score: float | None = field(default=None, metadata=_saved())
    best_step: int = field(default=0, metadata=_saved(int))
    best_metrics: dict[str, Any] = field(default_factory=dict, metadata=_saved(dict))
    bad_evals: int = field(default=0, metadata=_saved(int))
    stopped_early: bool = field(default=False, metadata=_saved(bool))
    last_val: dict[str, Any] | None = field(default=None, metadata=_saved())
    history: list[EvalRecord] = field(default_factory=list, metadata=_saved(list))
    # Seconds of training, including the time before a resume.
    elapsed: float = field(default=0.0, metadata=_saved(float))
    # Set between a step and the end of its bookkeeping: a checkpoint taken meanwhile (e.g.
    # by should_cancel during a long validation) replays that bookkeeping on resume.
    pending: PendingStep | None = field(default=None, metadata=_saved(optional=True))

    def to_json(self) -> dict[str, dict[str, Any]]:
        """``{"position": {...}, "state": {...}}`` for a checkpoint's JSON part."""
        out: dict[str, dict[str, Any]] = {"position": {}, "state": {}}
        for f in fields(self):
            out[f.metadata["section"]][f.metadata["key"] or f.name] = getattr(self, f.name)
        return out

    @classmethod
    def from_json(cls, meta: Mapping[str, Any]) -> TrainingState:
        """Inverse of :meth:`to_json`, reading the sections out of ``meta``.

        Raises KeyError / TypeError / ValueError on a missing or malformed field.
        """
        values: dict[str, Any] = {}
        for f in fields(cls):
            section, key = meta[f.metadata["section"]], f.metadata["key"] or f.name
            if f.metadata["optional"] and key not in section:
                continue  # the dataclass default
            values[f.name] = f.metadata["read"](section[key])
        return cls(**values)

    # --- bookkeeping at evaluation points ----------------------------------------------------

    def track_validation(self, val: dict[str, Any], metric: str, patience: int | None) -> bool:
        """Note an evaluation of the current step; True when it is the best so far (the caller
        keeps these weights). Stops early after ``patience`` evaluations without improvement."""
        self.last_val = val
        score = float(val[metric])
        if is_better(metric, score, self.best_score):
            self.best_score, self.best_step, self.best_metrics = score, self.step, val
            self.bad_evals = 0
            return True
        self.bad_evals += 1
        if patience is not None and self.bad_evals >= patience:
            self.stopped_early = True
        return False

    def record(
        self, epoch: float, train_loss: float, lr: float, val: dict[str, Any] | None, elapsed: float
    ) -> None:
        """Append this step's evaluation point to the history."""
        self.history.append(
            {
                "step": self.step,
                "epoch": epoch,
                "train_loss": train_loss,
                "lr": lr,
                "val": val,
                "elapsed": elapsed,
            }
        )
