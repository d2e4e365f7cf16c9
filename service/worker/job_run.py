"""Running one claimed job: data → core ``Trainer`` → events, checkpoints → adapter row.

The training loop reports through callbacks on the training thread; they write to the
database directly but are throttled (progress at most once a second, a metrics event every
``log_every`` steps), so a fast job does not turn into a write storm.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.adapters.store import adapter_row_from
from service.config import Settings
from service.datasets.codec import decode_rows
from service.db.models import Dataset, Job
from service.errors import ErrorKind, ServiceError
from service.jobs import queue
from service.worker.lease import LeaseKeeper

if TYPE_CHECKING:
    from core.base import BaseModel
    from core.training.trainer import ProgressEvent, Trainer

logger = logging.getLogger(__name__)

# About this many metrics events per job: enough for a smooth loss curve, few enough rows.
CURVE_POINTS = 100
PROGRESS_INTERVAL_S = 1.0


class JobSetupError(ServiceError):
    """The job cannot start as stored (its dataset is gone): it fails with this code."""


@dataclass
class _Progress:
    last_write: float = 0.0
    log_every: int = 1
    metrics: dict[str, Any] = field(default_factory=dict)


def _val_metrics(raw: dict[str, Any] | None) -> dict[str, Any]:
    """Flat ``val_*`` scalars of an evaluation (per-class tables stay in the final metrics)."""
    if not raw:
        return {}
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if isinstance(v, int | float):
            out[k if k.startswith("val_") else f"val_{k}"] = v
    return out


class JobRun:
    """One attempt at one job, on the worker that holds its lease."""

    def __init__(
        self,
        job: Job,
        *,
        factory: sessionmaker[Session],
        base: BaseModel,
        settings: Settings,
        worker_id: str,
        shutdown: threading.Event,
    ) -> None:
        self.job = job
        self.factory = factory
        self.base = base
        self.settings = settings
        self.worker_id = worker_id
        self.shutdown = shutdown
        self.trainer: Trainer | None = None
        self.keeper = LeaseKeeper(
            factory,
            job.id,
            worker_id,
            lease_seconds=settings.lease_seconds,
            heartbeat_seconds=settings.heartbeat_seconds,
        )
        self._progress = _Progress()
        self._saved_step = 0  # the step of the newest checkpoint this run wrote

    # --- the run -----------------------------------------------------------------------------

    def run(self) -> str:
        """Train to an outcome; returns the job's final (or requeued) status."""
        from core.errors import Cancelled, CoreError

        with self.keeper:
            try:
                self.trainer = self._make_trainer()
                self._progress.log_every = max(1, self.trainer.total_steps // CURVE_POINTS)
                result = self.trainer.train()
            except JobSetupError as e:
                return self._finish(
                    queue.finish_failure, message=e.message, code=e.code, param=e.param
                )
            except CoreError as e:
                return self._finish(
                    queue.finish_failure, message=str(e), code="invalid_training_data"
                )
            except Cancelled:
                return self._on_stopped()
            except Exception as e:
                logger.exception("job %s failed", self.job.id)
                return self._finish(
                    queue.finish_failure,
                    message=f"internal error while training: {type(e).__name__}",
                    code="internal_error",
                )
            finally:
                self._free()
            return self._store(result)

    def _make_trainer(self) -> Trainer:
        from core.training.checkpoint import CheckpointError
        from core.training.trainer import Trainer, TrainerCallbacks

        job = self.job
        with self.factory() as session:
            train_rows = self._rows(session, job.training_file, "training_file")
            val_rows = (
                self._rows(session, job.validation_file, "validation_file")
                if job.validation_file
                else None
            )
            kind = session.get(Dataset, job.training_file).kind  # type: ignore[union-attr]
            ckpt = queue.latest_checkpoint(session, job.id)
            ckpt_state, ckpt_step = (ckpt.state, ckpt.step) if ckpt is not None else (None, 0)
            session.expunge_all()

        method_type = job.method["type"]
        method = {"type": method_type, **(job.method.get(method_type) or {})}
        hyper = dict(job.hyperparameters or {})
        hyper.setdefault("seed", job.seed)
        hyper.setdefault("checkpoint_every_steps", self.settings.checkpoint_every_steps)
        head = {"task": "reward" if kind == "preference" else "classification"}
        callbacks = TrainerCallbacks(
            on_progress=self._on_progress,
            on_eval=self._on_eval,
            should_cancel=self._should_cancel,
            on_checkpoint=self._on_checkpoint,
        )
        if ckpt_state is not None:
            try:
                trainer = Trainer.resume(
                    ckpt_state, self.base, train_rows, val_rows, callbacks=callbacks
                )
            except CheckpointError as e:
                self._event(
                    f"Checkpoint at step {ckpt_step} unusable ({e}); starting over", "warning"
                )
            else:
                self._event(
                    f"Resumed from checkpoint at step {ckpt_step}",
                    data={"step": ckpt_step, "resumed": True, "threads": _threads()},
                )
                return trainer
        trainer = Trainer(self.base, method, head, train_rows, val_rows, hyper, callbacks)
        trainer.setup()
        self._event(
            f"Training {method_type} on {len(train_rows)} rows: {trainer.total_steps} steps",
            data={
                "total_steps": trainer.total_steps,
                "method": method_type,
                "threads": _threads(),
            },
        )
        return trainer

    def _rows(self, session: Session, dataset_id: str, param: str) -> list[dict[str, Any]]:
        ds = session.get(Dataset, dataset_id)
        if ds is None or ds.tenant_id != self.job.tenant_id:
            raise JobSetupError(
                f"{param} {dataset_id!r} no longer exists",
                code="file_not_found",
                param=param,
                kind=ErrorKind.NOT_FOUND,
            )
        return decode_rows(ds.rows, ds.rows_encoding)

    # --- callbacks (training thread) ---------------------------------------------------------

    def _should_cancel(self) -> bool:
        if self.keeper.lost.is_set() or self.keeper.cancel_requested.is_set():
            return True
        if not self.shutdown.is_set():
            return False
        # Graceful shutdown: save where we are, then stop; the job goes back to the queue.
        # (Nothing to save when the newest checkpoint is already at this step.)
        trainer = self.trainer
        if trainer is not None and trainer.state.step > self._saved_step:
            st = trainer.state
            self._on_checkpoint(trainer.save_checkpoint(), st.step, st.epoch, {})
        return True

    def _on_progress(self, ev: ProgressEvent) -> None:
        p = self._progress
        p.metrics.update({"train_loss": ev.train_loss, "lr": ev.lr, "step": ev.step})
        if ev.elapsed > 0:
            p.metrics["steps_per_second"] = ev.step / ev.elapsed
        done = ev.step >= ev.total_steps
        if ev.step % p.log_every == 0 or done:
            self._event(
                f"Step {ev.step}/{ev.total_steps}: training loss={ev.train_loss:.4f}",
                type="metrics",
                data={
                    "step": ev.step,
                    "total_steps": ev.total_steps,
                    "epoch": ev.epoch,
                    "train_loss": ev.train_loss,
                    "step_loss": ev.step_loss,
                    "lr": ev.lr,
                },
            )
        now = time.monotonic()
        if now - p.last_write < PROGRESS_INTERVAL_S and not done:
            return
        p.last_write = now
        remaining = (ev.total_steps - ev.step) * ev.elapsed / max(ev.step, 1)
        from datetime import timedelta

        from service.db.types import utcnow

        with self.factory() as session:
            alive = queue.report_progress(
                session,
                self.job.id,
                self.worker_id,
                self.settings.lease_seconds,
                step=ev.step,
                total_steps=ev.total_steps,
                epoch=ev.epoch,
                metrics=dict(p.metrics),
                estimated_finish=utcnow() + timedelta(seconds=remaining),
            )
        if not alive:
            self.keeper.lost.set()

    def _on_eval(self, ev: ProgressEvent) -> None:
        val = _val_metrics(ev.val_metrics)
        self._progress.metrics.update(val)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in val.items() if isinstance(v, float))
        self._event(
            f"Validation at step {ev.step}: {shown}",
            type="metrics",
            data={"step": ev.step, "total_steps": ev.total_steps, "epoch": ev.epoch, **val},
        )

    def _on_checkpoint(self, state: bytes, step: int, epoch: int, metrics: dict[str, Any]) -> None:
        self._saved_step = step
        with self.factory() as session:
            job = session.get(Job, self.job.id)
            assert job is not None
            try:
                queue.save_checkpoint(
                    session,
                    job,
                    worker_id=self.worker_id,
                    step=step,
                    state=state,
                    epoch=float(epoch),
                    metrics=_val_metrics(metrics) or None,
                )
            except queue.LeaseLostError:
                self.keeper.lost.set()

    # --- outcomes ----------------------------------------------------------------------------

    def _store(self, result: Any) -> str:
        from core.training.trainer import TrainResult

        assert isinstance(result, TrainResult)
        metrics = _json_safe(result.metrics)
        row = adapter_row_from(result.adapter, self.base, metrics=metrics)
        with self.factory() as session:
            job = session.get(Job, self.job.id)
            assert job is not None
            try:
                queue.finish_success(session, job, row, worker_id=self.worker_id, metrics=metrics)
            except queue.LeaseLostError:
                return "lease_lost"
            except IntegrityError:
                return self._finish(
                    queue.finish_failure,
                    message=f"an adapter named {job.adapter_name!r} was created meanwhile",
                    code="adapter_name_taken",
                )
            return job.status

    def _on_stopped(self) -> str:
        if self.keeper.lost.is_set():
            return "lease_lost"  # someone else owns the job now: write nothing
        if self.shutdown.is_set() and not self.keeper.cancel_requested.is_set():
            with self.factory() as session:
                job = session.get(Job, self.job.id)
                assert job is not None
                queue.release_job(
                    session, job, worker_id=self.worker_id, reason="worker shutting down"
                )
            return "queued"
        return self._finish(queue.finish_cancelled)

    def _finish(self, outcome: Any, **kwargs: Any) -> str:
        with self.factory() as session:
            job = session.get(Job, self.job.id)
            assert job is not None
            try:
                outcome(session, job, worker_id=self.worker_id, **kwargs)
            except queue.LeaseLostError:
                return "lease_lost"
            return job.status

    def _event(
        self, message: str, level: str = "info", type: str = "message", data: Any = None
    ) -> None:
        """Log an event on the job, only while this worker holds its lease."""
        if self.keeper.lost.is_set():
            return
        with self.factory() as session:
            try:
                queue.add_owned_event(
                    session,
                    self.job,
                    worker_id=self.worker_id,
                    message=message,
                    level=level,
                    type=type,
                    data=_json_safe(data),
                )
            except queue.LeaseLostError:
                self.keeper.lost.set()

    def _free(self) -> None:
        """Drop the model, optimizer and data now, not when the next job replaces them."""
        if self.trainer is not None:
            self.trainer.close()
        self.trainer = None
        gc.collect()
        release_free_memory()


def release_free_memory() -> bool:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``); False where unavailable.

    Without it a cancelled or finished job's tensors are freed but glibc keeps most of the
    pages. Measured on a cancelled ``full`` MiniLM job (idle worker ~460 MiB, ~890 MiB while
    training): ~300 MiB stayed resident without it, ~20 MiB with it (together with the
    SQLite statement-cache setting in ``service.db.session``). The worker then holds little
    more than the base model between jobs; ``tests/e2e/test_faults.py`` checks it.
    """
    import ctypes
    import ctypes.util

    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
        except OSError:
            _libc = False
    if not _libc or not hasattr(_libc, "malloc_trim"):
        return False
    return bool(_libc.malloc_trim(0))


_libc: Any = None


def _threads() -> int:
    """The torch thread budget this worker trains with (``train_threads``), for the events."""
    import torch

    return int(torch.get_num_threads())


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON; PostgreSQL's json type rejects them."""
    import math

    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
