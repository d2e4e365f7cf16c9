"""TrainingState: how checkpoints save it, and its best-so-far / early-stopping rules."""

from __future__ import annotations

import json
from typing import Any

import pytest

from core.training.state import TrainingState


def _busy_state() -> TrainingState:
    """A state with no field at its default, as in the middle of a run."""
    return TrainingState(
        step=9,
        epoch=1,
        batch_in_epoch=3,
        loss_sum=1.25,
        loss_count=3,
        trained_tokens=412,
        best_score=0.75,
        best_step=6,
        best_metrics={"accuracy": 0.75, "loss": 0.5},
        bad_evals=1,
        stopped_early=True,
        last_val={"accuracy": 0.5, "loss": 0.7},
        history=[
            {"step": 6, "epoch": 1.0, "train_loss": 0.6, "lr": 0.01, "val": None, "elapsed": 2.0}
        ],
        elapsed=3.5,
        pending={"epoch": 1.5, "end_of_epoch": False, "train_loss": 0.4, "lr": 0.01, "loss": 0.3},
    )


def test_checkpoint_json_round_trip_keeps_every_field() -> None:
    state = _busy_state()
    assert TrainingState() != state  # every field differs from its default
    meta = json.loads(json.dumps(state.to_json()))
    assert TrainingState.from_json(meta) == state


def test_checkpoint_keys_are_those_format_1_checkpoints_carry() -> None:
    """Checkpoints already in databases are read by these keys: renaming a field must not
    rename its key."""
    saved = TrainingState().to_json()
    assert list(saved["position"]) == ["step", "epoch", "batch"]
    assert list(saved["state"]) == [
        "loss_sum", "loss_count", "trained_tokens", "best_score", "best_step", "best_metrics",
        "bad_evals", "stopped_early", "last_val", "history", "elapsed", "pending",
    ]  # fmt: skip


def test_older_checkpoints_without_tokens_or_pending_load_defaults() -> None:
    meta: dict[str, Any] = _busy_state().to_json()
    del meta["state"]["trained_tokens"], meta["state"]["pending"]
    loaded = TrainingState.from_json(meta)
    assert loaded.trained_tokens == 0 and loaded.pending is None
    assert loaded.step == 9 and loaded.best_step == 6


@pytest.mark.parametrize(("section", "key"), [("position", "batch"), ("state", "best_step")])
def test_a_missing_required_field_is_named(section: str, key: str) -> None:
    meta: dict[str, Any] = _busy_state().to_json()
    del meta[section][key]
    with pytest.raises(KeyError, match=key):
        TrainingState.from_json(meta)


def test_values_are_read_back_as_their_types() -> None:
    """JSON gives back what a tampered or hand-written checkpoint holds; counters are ints."""
    meta: dict[str, Any] = _busy_state().to_json()
    meta["position"]["step"], meta["state"]["elapsed"] = 9.0, 3
    loaded = TrainingState.from_json(meta)
    assert type(loaded.step) is int and type(loaded.elapsed) is float
    meta["state"]["loss_count"] = "three"
    with pytest.raises(ValueError):
        TrainingState.from_json(meta)


def test_best_so_far_and_early_stopping() -> None:
    st = TrainingState()
    evals = [(1, 0.6), (2, 0.8), (3, 0.7), (4, 0.8), (5, 0.5)]  # accuracy per step
    improved = []
    for step, acc in evals:
        st.step = step
        improved.append(st.track_validation({"accuracy": acc}, "accuracy", patience=3))
        st.record(step / 5, 0.1, 0.01, {"accuracy": acc}, float(step))
    # A tie is no improvement; three evaluations without one stop the run.
    assert improved == [True, True, False, False, False]
    assert (st.best_step, st.best_score, st.bad_evals, st.stopped_early) == (2, 0.8, 3, True)
    assert st.last_val == {"accuracy": 0.5}
    assert [h["step"] for h in st.history] == [1, 2, 3, 4, 5]


def test_lower_loss_is_better_and_no_patience_never_stops() -> None:
    st = TrainingState()
    for step, loss in enumerate([0.9, 0.7, 0.8, 0.95, 0.99], start=1):
        st.step = step
        st.track_validation({"loss": loss}, "loss", patience=None)
    assert (st.best_step, st.best_score, st.stopped_early) == (2, 0.7, False)
