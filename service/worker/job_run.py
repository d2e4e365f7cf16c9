"""Running one claimed job: data → core ``Trainer`` → events, checkpoints → adapter row.

The training file's kind decides the trainer: ``Trainer`` on an encoder base (classification,
reward), ``DecoderTrainer`` on a decoder base (chat SFT, DPO) and ``DecoderHeadTrainer`` for a
decoder's classifiers and reward models (last-token heads); everything else (events,
checkpoints and resume, cancel, time limit, the adapter row) is one path for both.

The training loop reports through callbacks on the training thread; they write to the
database directly but are throttled (progress at most once a second, a metrics event every
``log_every`` steps), so a fast job does not turn into a write storm. Whatever way a run
ends, its last step's progress is written before the outcome, so the job object agrees with
its last event. The cancel flag is read before every step (one primary-key read), so a
cancelled job stops after the step it is in; so does one whose training passed
``max_job_seconds``, which then fails.

The worker's log gets HF Trainer-style lines: the resolved plan at the start, a progress
line (step/total, epoch, loss, lr, it/s) every ``LOG_INTERVAL_S``, validation results, and
the outcome with its metrics.

It stays one module past ~400 lines because ``JobRun`` is one flow: its callbacks and outcome
writes share one attempt's state (lease keeper, newest step, saved step, cancel flag) and their
order (the last step's progress before the outcome) is the point. Its pure helpers live in
``report.py`` and ``memory.py``.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.adapters.store import adapter_from_row, adapter_row_from
from service.config import Settings
from service.datasets.codec import decode_rows
from service.datasets.rows import TASKS, DatasetKind
from service.db.models import AdapterRow, Dataset, Job, JobStatus
from service.db.outage import database_transient
from service.db.types import utcnow
from service.errors import ErrorKind, ServiceError
from service.jobs import checkpoints, outcomes, queue
from service.jobs.events import EventLevel, EventType
from service.worker.lease import LeaseKeeper
from service.worker.memory import release_free_memory
from service.worker.report import (
    checkpoint_metrics,
    json_safe,
    pair_summary,
    plan_summary,
    torch_threads,
    val_metrics,
)

if TYPE_CHECKING:
    from core.adapter import Adapter
    from core.base import FrozenBase
    from core.decoder.base import DecoderBase
    from core.training.trainer import ProgressEvent, Trainer

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# About this many metrics events per job: enough for a smooth loss curve, few enough rows.
CURVE_POINTS = 100
PROGRESS_INTERVAL_S = 1.0
# A progress line in the worker's log this often (and at the first and last step).
LOG_INTERVAL_S = 10.0


class JobSetupError(ServiceError):
    """The job cannot start as stored (its dataset is gone): it fails with this code."""


class RunOutcome(StrEnum):
    """How one run of a job ended: the job's status it left behind, or ``lease_lost``.

    The values are what the worker logs ("job ... ended: lease_lost") and, but for
    ``lease_lost``, the job's stored status.
    """

    SUCCEEDED = JobStatus.SUCCEEDED.value
    FAILED = JobStatus.FAILED.value
    CANCELLED = JobStatus.CANCELLED.value
    # The worker is shutting down, or the database went away mid-run: queued again, to resume.
    REQUEUED = JobStatus.QUEUED.value
    LEASE_LOST = "lease_lost"  # another worker owns the job now: this run wrote nothing


@dataclass
class _Progress:
    last_write: float = 0.0
    last_log: float = 0.0
    log_every: int = 1
    metrics: dict[str, Any] = field(default_factory=dict)
    last: ProgressEvent | None = None  # the newest step reported by the trainer
    written: bool = True  # whether ``last`` is on the job row


class JobRun:
    """One attempt at one job, on the worker that holds its lease."""

    def __init__(
        self,
        job: Job,
        *,
        factory: sessionmaker[Session],
        base: FrozenBase | DecoderBase,
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
        self.task = ""  # the core task the training file trains, once the run is set up
        self.keeper = LeaseKeeper(
            factory,
            job.id,
            worker_id,
            lease_seconds=settings.lease_seconds,
            heartbeat_seconds=settings.heartbeat_seconds,
        )
        self._progress = _Progress()
        self._saved_step = 0  # the step of the newest checkpoint this run wrote
        self._cancel_requested = False  # seen in the database by _should_cancel
        self._time_limit_hit = False  # training passed settings.max_job_seconds

    # --- the run -----------------------------------------------------------------------------

    def run(self) -> RunOutcome:
        """Train to an outcome; returns the job's final (or requeued) status."""
        from core.errors import Cancelled, CoreError

        with self.keeper:
            try:
                self.trainer = self._make_trainer()
                self._progress.log_every = max(1, self.trainer.total_steps // CURVE_POINTS)
                result = self.trainer.train()
            except JobSetupError as e:
                return self._finish(
                    outcomes.finish_failure, message=e.message, code=e.code, param=e.param
                )
            except CoreError as e:
                return self._finish(
                    outcomes.finish_failure,
                    message=str(e),
                    code="invalid_training_data",
                    param=self._setting_param(e),
                )
            except Cancelled:
                return self._on_stopped()
            except Exception as e:
                if database_transient(e):  # the database's state, not the job's fault
                    return self._requeue(f"database unavailable ({type(e).__name__})")
                logger.exception("job %s failed", self.job.id)
                return self._finish(
                    outcomes.finish_failure,
                    message=f"internal error while training: {type(e).__name__}",
                    code="internal_error",
                )
            finally:
                self._free()
            return self._store(result)

    def _make_trainer(self) -> Trainer:
        from core.decoder.base import DecoderBase
        from core.heads import LANGUAGE_MODEL_TASKS
        from core.training.checkpoint import CheckpointError
        from core.training.decoder import DecoderTrainer
        from core.training.decoder_head import DecoderHeadTrainer
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
            reference_id = job.method.get("reference_adapter")
            reference = self._reference(session, reference_id) if reference_id else None
            ckpt = checkpoints.latest_checkpoint(session, job.id)
            ckpt_state, ckpt_step = (ckpt.state, ckpt.step) if ckpt is not None else (None, 0)
            session.expunge_all()

        method_type = job.method["type"]
        method = {"type": method_type, **(job.method.get(method_type) or {})}
        hyper = dict(job.hyperparameters or {})
        hyper.setdefault("seed", job.seed)
        hyper.setdefault("checkpoint_every_steps", self.settings.checkpoint_every_steps)
        self.task = TASKS[DatasetKind(kind)]
        head = {"task": self.task}
        trainer_cls: type[Trainer] = Trainer
        options: dict[str, Any] = {}
        if self.task in LANGUAGE_MODEL_TASKS:
            self._check_decoder_base()
            trainer_cls = DecoderTrainer
            options = {"reference_adapter": reference}
        elif isinstance(self.base, DecoderBase):  # a classifier or reward model, last token
            trainer_cls = DecoderHeadTrainer
        callbacks = TrainerCallbacks(
            on_progress=self._on_progress,
            on_eval=self._on_eval,
            should_cancel=self._should_cancel,
            on_checkpoint=self._on_checkpoint,
        )
        if ckpt_state is not None:
            try:
                trainer = trainer_cls.resume(
                    ckpt_state,
                    self.base,  # type: ignore[arg-type]
                    train_rows,
                    val_rows,
                    callbacks=callbacks,
                    **options,
                )
            except CheckpointError as e:
                self._event(f"Checkpoint at step {ckpt_step} unusable ({e}); starting over", "warn")
            else:
                # The plan was said when the run first started; its data is repeated here.
                self._record_plan(
                    trainer.resolved_hyperparameters(),
                    method_type,
                    f"Resumed from checkpoint at step {ckpt_step}",
                    {"step": ckpt_step, "resumed": True},
                )
                return trainer
        trainer = trainer_cls(
            self.base,  # type: ignore[arg-type]
            method,
            head,
            train_rows,
            val_rows,
            hyper,
            callbacks,
            **options,
        )
        trainer.setup()
        resolved = trainer.resolved_hyperparameters()
        pairs = trainer.pair_report()
        self._record_plan(
            resolved,
            method_type,
            f"Training {method_type}: {plan_summary(resolved)}{pair_summary(pairs)}",
            {"pairs": pairs} if pairs is not None else {},
        )
        return trainer

    def _record_plan(
        self, resolved: dict[str, Any], method_type: str, message: str, data: dict[str, Any]
    ) -> None:
        """Put what the run resolved on the job with an event, and log it."""
        data = {
            **data,
            "method": method_type,
            "total_steps": resolved["total_steps"],
            "threads": torch_threads(),
            "hyperparameters": resolved,
        }
        logger.info(
            "job %s: %s; resolved hyperparameters: %s",
            self.job.id,
            message,
            " ".join(f"{k}={v}" for k, v in resolved.items()),
        )
        self._owned_write(
            queue.record_training_plan,
            resolved=json_safe(resolved),
            message=message,
            data=json_safe(data),
        )

    def _setting_param(self, error: Exception) -> str | None:
        """The request field a core ``ConfigError`` names (``layers``: ``method.lora.layers``,
        ``metric_for_best``: ``method.hyperparameters.metric_for_best``), as the create
        route's 422 names it; None for any other error or a field the request has not."""
        from core.errors import ConfigError
        from core.methods import METHODS
        from core.training.config import TrainingConfig

        if not isinstance(error, ConfigError):
            return None
        field, method_type = error.field, self.job.method["type"]
        if field in TrainingConfig.model_fields:
            return f"method.hyperparameters.{field}"
        if method_type in METHODS and field in METHODS[method_type].model_fields:
            return f"method.{method_type}.{field}"
        return {"type": "method.type", "reference_adapter": "reference_adapter"}.get(field)

    def _check_decoder_base(self) -> None:
        from core.decoder.base import DecoderBase

        if not isinstance(self.base, DecoderBase):
            raise JobSetupError(
                f"a {self.task} job trains on a decoder base; {self.job.model} is not one",
                code="model_task_mismatch",
                param="model",
            )

    def _reference(self, session: Session, adapter_id: str) -> Adapter:
        """The DPO reference adapter the job was created with (pinned by id)."""
        row = session.get(AdapterRow, adapter_id)
        if row is None or row.tenant_id != self.job.tenant_id:
            raise JobSetupError(
                f"reference_adapter {adapter_id!r} no longer exists",
                code="adapter_not_found",
                param="reference_adapter",
                kind=ErrorKind.NOT_FOUND,
            )
        return adapter_from_row(row)

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
        if self.keeper.lost.is_set():
            return True
        if self._cancel_requested or self._read_cancel_flag():
            self._cancel_requested = True
            return True
        trainer = self.trainer
        # The trainer's elapsed time sums every attempt's training (it is in the checkpoint),
        # so a job cannot dodge the limit by being requeued; time spent queued is not counted.
        if trainer is not None and trainer.state.elapsed > self.settings.max_job_seconds:
            self._time_limit_hit = True
        elif not self.shutdown.is_set():
            return False
        # Save where we are, then stop: a shut-down worker's job resumes from here, and a job
        # past its time limit keeps its progress. (Nothing to save when the newest checkpoint
        # is already at this step.)
        if trainer is not None and trainer.state.step > self._saved_step:
            self._on_checkpoint(
                trainer.save_checkpoint(), trainer.state.step, trainer.epochs_done, {}
            )
        return True

    def _read_cancel_flag(self) -> bool:
        # Every step, not every heartbeat: a heartbeat apart, a fast job ran ~10 more steps
        # after it was cancelled. One primary-key read is small next to a training step:
        # ~0.6 ms on SQLite (measured on a busy 2-core VM) against ~30 ms for a step of the
        # tests' tiny model and most of a second for a MiniLM LoRA step on CPU.
        try:
            with self.factory() as session:
                return queue.is_cancel_requested(session, self.job.id)
        except SQLAlchemyError:
            # A database hiccup must not fail the job: the next step asks again, and the lease
            # keeper stops the run if the database stays away for a whole lease.
            logger.warning("job %s: reading the cancel flag failed", self.job.id, exc_info=True)
            return False

    def _on_progress(self, ev: ProgressEvent) -> None:
        p = self._progress
        p.last, p.written = ev, False
        p.metrics.update({"train_loss": ev.train_loss, "lr": ev.lr, "step": ev.step})
        if ev.elapsed > 0:
            p.metrics["steps_per_second"] = ev.step / ev.elapsed
        done = ev.step >= ev.total_steps
        if ev.step % p.log_every == 0 or done:
            data = {
                "step": ev.step,
                "total_steps": ev.total_steps,
                "epoch": ev.epoch,
                "train_loss": ev.train_loss,
                "step_loss": ev.step_loss,
                "lr": ev.lr,
                "trained_tokens": ev.trained_tokens,
                **self._task_metrics(ev),
            }
            # The message shows the event's own train_loss (a chat job's is the step's).
            self._event(
                f"Step {ev.step}/{ev.total_steps}: training loss={data['train_loss']:.4f}",
                type="metrics",
                data=data,
            )
        now = time.monotonic()
        if ev.step == 1 or done or now - p.last_log >= LOG_INTERVAL_S:
            p.last_log = now
            logger.info(
                "job %s step %d/%d (%d%%) epoch %.2f loss %.4f lr %.3g %.2f it/s",
                self.job.id,
                ev.step,
                ev.total_steps,
                100 * ev.step // ev.total_steps,
                ev.epoch,
                ev.train_loss,
                ev.lr,
                p.metrics.get("steps_per_second", 0.0),
            )
        if now - p.last_write >= PROGRESS_INTERVAL_S or done:
            p.last_write = now
            self._write_progress()

    def _write_progress(self) -> None:
        """Put the newest step's progress on the job row (if not there yet) and extend the lease."""
        p = self._progress
        ev = p.last
        if ev is None or p.written or self.keeper.lost.is_set():
            return
        remaining = (ev.total_steps - ev.step) * ev.elapsed / max(ev.step, 1)

        def report() -> None:
            with self.factory() as session:
                alive = queue.report_progress(
                    session,
                    self.job.id,
                    self.worker_id,
                    self.settings.lease_seconds,
                    step=ev.step,
                    total_steps=ev.total_steps,
                    epoch=ev.epoch,
                    metrics=json_safe(p.metrics),
                    trained_tokens=ev.trained_tokens,
                    estimated_finish=utcnow() + timedelta(seconds=remaining),
                )
            if not alive:
                self.keeper.lost.set()

        # Not written: the next step's report carries it (``written`` stays False).
        p.written = self._unless_outage("progress", report)

    def _on_eval(self, ev: ProgressEvent) -> None:
        val = val_metrics(ev.val_metrics)
        self._progress.metrics.update(val)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in val.items() if isinstance(v, float))
        logger.info("job %s validation at step %d: %s", self.job.id, ev.step, shown)
        self._event(
            f"Validation at step {ev.step}: {shown}",
            type="metrics",
            data={
                "step": ev.step,
                "total_steps": ev.total_steps,
                "epoch": ev.epoch,
                **val,
                **self._task_metrics(ev),
            },
        )

    def _task_metrics(self, ev: ProgressEvent) -> dict[str, float]:
        """A decoder task's metrics under the names its users read: a chat run's as OpenAI's
        fine-tuning events name them (``train_loss`` is then the step's loss, as OpenAI's;
        ``valid_loss``, ``full_valid_loss``, ``valid_mean_token_accuracy``), a DPO run's
        step metrics as TRL's DPOTrainer names them (``rewards/chosen``, ...)."""
        if self.task == "chat":
            from core.training.decoder import openai_chat_metrics

            # "step" is the event's own (an integer), not the float OpenAI's metrics carry.
            return {k: v for k, v in openai_chat_metrics(ev).items() if k != "step"}
        return dict(ev.step_metrics)

    def _on_checkpoint(self, state: bytes, step: int, epoch: int, metrics: dict[str, Any]) -> None:
        def save() -> None:
            with self.factory() as session:
                job = session.get(Job, self.job.id)
                assert job is not None
                try:
                    checkpoints.save_checkpoint(
                        session,
                        job,
                        worker_id=self.worker_id,
                        step=step,
                        state=state,
                        epoch=float(epoch),
                        metrics=checkpoint_metrics(metrics, step, self.task),
                    )
                except queue.LeaseLostError:
                    self.keeper.lost.set()

        # Not saved: training goes on, and the next checkpoint is saved at its step.
        if self._unless_outage(f"checkpoint at step {step}", save):
            self._saved_step = step

    # --- outcomes ----------------------------------------------------------------------------

    def _store(self, result: Any) -> RunOutcome:
        from core.training.trainer import TrainResult

        assert isinstance(result, TrainResult)
        metrics = json_safe(result.metrics)
        row = adapter_row_from(result.adapter, self.base, metrics=metrics)
        # Early stopping ends before the last planned step: that step's progress may be unsent.
        self._write_progress()

        def store() -> RunOutcome | None:  # None: another adapter took the name meanwhile
            with self.factory() as session:
                job = session.get(Job, self.job.id)
                assert job is not None
                try:
                    outcomes.finish_success(
                        session, job, row, worker_id=self.worker_id, metrics=metrics
                    )
                except queue.LeaseLostError:
                    return RunOutcome.LEASE_LOST
                except IntegrityError:
                    return None
                logger.info(
                    "job %s succeeded: adapter %r version %s, %s steps (%.2f epochs), "
                    "%s trained tokens, %.1f s; metrics: %s",
                    job.id,
                    row.name,
                    row.version,
                    result.steps,
                    result.metrics["epochs"],
                    result.metrics["trained_tokens"],
                    self._progress.last.elapsed if self._progress.last else 0.0,
                    " ".join(
                        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in metrics.items()
                        if isinstance(v, int | float) and not isinstance(v, bool)
                    ),
                )
                return RunOutcome(job.status)

        outcome = self._through_outage(store)
        if outcome is None:
            return self._finish(
                outcomes.finish_failure,
                message=f"an adapter named {self.job.adapter_name!r} was created meanwhile",
                code="adapter_name_taken",
            )
        return outcome

    def _on_stopped(self) -> RunOutcome:
        if self.keeper.lost.is_set():
            return RunOutcome.LEASE_LOST
        if self._time_limit_hit:
            return self._finish(
                outcomes.finish_failure,
                message=f"training took longer than the {self.settings.max_job_seconds:g} s "
                f"a job may take (stopped at step {self._step()}; its last checkpoint is kept)",
                code="job_time_limit_exceeded",
            )
        if self.shutdown.is_set() and not self._cancel_requested:
            return self._requeue("worker shutting down")
        return self._finish(outcomes.finish_cancelled)

    def _requeue(self, reason: str) -> RunOutcome:
        """Give the job back to the queue, no attempt counted: it resumes from its newest
        checkpoint on the next worker to claim it."""
        self._write_progress()
        logger.info("job %s requeued at step %s: %s", self.job.id, self._step(), reason)

        def release() -> bool:
            with self.factory() as session:
                job = session.get(Job, self.job.id)
                assert job is not None
                return queue.release_job(session, job, worker_id=self.worker_id, reason=reason)

        return RunOutcome.REQUEUED if self._through_outage(release) else RunOutcome.LEASE_LOST

    def _finish(self, finish: Callable[..., object], **kwargs: Any) -> RunOutcome:
        """Fail or cancel the job, its last step's progress written first."""
        self._write_progress()

        def write() -> RunOutcome:
            with self.factory() as session:
                job = session.get(Job, self.job.id)
                assert job is not None
                try:
                    finish(session, job, worker_id=self.worker_id, **kwargs)
                except queue.LeaseLostError:
                    return RunOutcome.LEASE_LOST
                reason = f": {kwargs['message']}" if "message" in kwargs else ""
                logger.info(
                    "job %s %s at step %s/%s%s",
                    job.id,
                    job.status,
                    job.step,
                    job.total_steps,
                    reason,
                )
                return RunOutcome(job.status)

        return self._through_outage(write)

    def _through_outage(self, write: Callable[[], _T]) -> _T:
        """``write()``, retried while the database is busy or out of reach, for up to a lease
        (by then another worker may hold the job, and the lease fence refuses the write): a
        run's outcome is worth waiting for, where a dropped connection failed the job."""
        deadline = time.monotonic() + self.settings.lease_seconds
        delay = 0.25
        while True:
            try:
                return write()
            except SQLAlchemyError as exc:
                if not database_transient(exc) or time.monotonic() + delay > deadline:
                    raise
                logger.warning(
                    "job %s: the database is unavailable; retrying in %.2g s: %s",
                    self.job.id,
                    delay,
                    exc,
                )
            time.sleep(delay)
            delay = min(2 * delay, 4.0)

    def _unless_outage(self, what: str, write: Callable[[], None]) -> bool:
        """``write()``; False, with a warning, where the database is busy or out of reach. A
        write the run can go on without (its progress, an event, a checkpoint) must not fail
        the job (one dropped connection failed it, its checkpoint unused); the lease keeper
        stops the run if the database stays away for a whole lease."""
        try:
            write()
            return True
        except SQLAlchemyError as exc:
            if not database_transient(exc):
                raise
            logger.warning(
                "job %s: %s not written, database unavailable: %s", self.job.id, what, exc
            )
            return False

    def _step(self) -> int:
        """The newest step the trainer reported (0 before the first)."""
        return self._progress.last.step if self._progress.last is not None else 0

    def _event(
        self,
        message: str,
        level: EventLevel = "info",
        type: EventType = "message",
        data: Any = None,
    ) -> None:
        """Log an event on the job, only while this worker holds its lease."""
        self._owned_write(
            queue.add_owned_event, message=message, level=level, type=type, data=json_safe(data)
        )

    def _owned_write(self, write: Callable[..., None], **kwargs: Any) -> None:
        """A lease-fenced queue write (``write(session, job, worker_id=..., **kwargs)``); once
        the lease is lost nothing more is written and the run stops."""
        if self.keeper.lost.is_set():
            return

        def owned() -> None:
            with self.factory() as session:
                try:
                    write(session, self.job, worker_id=self.worker_id, **kwargs)
                except queue.LeaseLostError:
                    self.keeper.lost.set()

        self._unless_outage(write.__name__, owned)

    def _free(self) -> None:
        """Drop the model, optimizer and data now, not when the next job replaces them."""
        if self.trainer is not None:
            self.trainer.close()
        self.trainer = None
        gc.collect()
        release_free_memory()
