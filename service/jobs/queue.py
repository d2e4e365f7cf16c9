"""The job queue, in the database: claims, leases and the lease fence.

Pure SQLAlchemy, no HTTP and no core. A worker:

1. ``claim_next_job`` — wins at most one queued job, atomically, with a lease;
2. ``heartbeat`` / ``report_progress`` — extend the lease; ``False`` means it was lost (the
   job was requeued or cancelled elsewhere) and the worker must stop without writing more;
3. ``checkpoints.save_checkpoint`` / ``latest_checkpoint`` — resumable state, so a requeued
   job resumes;
4. ``outcomes.finish_success`` / ``finish_failure`` / ``finish_cancelled`` — the outcome.

Any process may call ``requeue_expired`` (the embedded worker does, each poll) to return jobs
whose worker died to the queue.

Every function commits its own transaction, except ``events.add_event`` which joins the
caller's. Worker-side writes name the ``worker_id`` explicitly and only apply while that worker
still holds the lease: they go through ``touch_owned`` (checkpoints and outcomes too), which
raises :class:`LeaseLostError` otherwise.

SQLite note: call these with a session that has no transaction open. pysqlite begins the
transaction at the first write, so each UPDATE below takes the write lock (waiting up to
busy_timeout) and evaluates its WHERE clause against the latest committed state.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, DateTime, func, select, update
from sqlalchemy.orm import Session, aliased

from service.db.models import ACTIVE_STATUSES, LEASED_STATUSES, Job, JobStatus
from service.db.types import utcnow
from service.jobs.events import EventLevel, EventType, add_event


class LeaseLostError(RuntimeError):
    """The worker no longer holds this job's lease; it must drop the job silently."""


# --- claiming and leases ---------------------------------------------------------------------


def _lease_clock(session: Session, now: datetime | None) -> Any:
    """The clock leases are set and expired by: ``now`` when given (tests), else PostgreSQL's
    ``clock_timestamp()`` (workers on many machines then agree on when a lease expires, however
    far apart their own clocks drift), else this machine's clock (SQLite is one machine)."""
    if now is not None:
        return now
    if session.get_bind().dialect.name == "postgresql":
        return func.clock_timestamp(type_=DateTime(timezone=True))
    return utcnow()


def _next_queued(models: Collection[str] | None = None) -> Any:
    """The queued job to run next: fair share across tenants, then first come, first served.

    ``models``: only jobs on these bases (the ones the claiming worker loaded); None: any.

    Jobs of the tenant with the fewest jobs running go first (a tenant with a long job running
    and more queued waits behind another tenant's first job); among tenants running as many,
    the one whose last job started longest ago (never first), then the oldest job. Without
    that middle key a single worker (the embedded default) sees 0 running for everyone each
    time a job ends and serves one tenant's whole backlog first: bench.noisy_neighbour measured
    B's one job waiting behind all of A's. Both keys are correlated subqueries, decided in the
    same statement as the claim.
    """
    candidate = aliased(Job, name="candidate")
    running = aliased(Job, name="running")
    started = aliased(Job, name="started")
    tenant_running = (
        select(func.count())
        .select_from(running)
        .where(running.tenant_id == candidate.tenant_id, running.status.in_(LEASED_STATUSES))
        .scalar_subquery()
    )
    tenant_last_start = (
        select(func.max(started.started_at))
        .where(started.tenant_id == candidate.tenant_id)
        .scalar_subquery()
    )
    queued = select(candidate.id).where(candidate.status == JobStatus.QUEUED)
    if models is not None:
        queued = queued.where(candidate.model.in_(list(models)))
    return queued.order_by(
        tenant_running,
        tenant_last_start.asc().nulls_first(),
        candidate.created_at,
        candidate.id,
    ).limit(1)


def claim_next_job(
    session: Session,
    worker_id: str,
    lease_seconds: float,
    *,
    now: datetime | None = None,
    models: Collection[str] | None = None,
) -> Job | None:
    """Move the next queued job (:func:`_next_queued`) to ``running`` under ``worker_id``'s
    lease, or None. ``models``: claim only jobs on these bases (None: any); a job on a base
    this worker did not load waits for a worker that did.

    One statement decides the winner: ``UPDATE ... WHERE id = (next queued) AND status =
    'queued'``. Concurrent workers serialise on the row (PostgreSQL) or the database write
    lock (SQLite); the loser's ``status = 'queued'`` no longer holds and it updates nothing.
    On PostgreSQL the candidate is picked with ``FOR UPDATE SKIP LOCKED`` so workers take
    different jobs instead of queueing behind one row.
    """
    clock = _lease_clock(session, now)
    values = {
        "status": JobStatus.RUNNING,
        "worker_id": worker_id,
        "lease_expires_at": clock + timedelta(seconds=lease_seconds),
        "started_at": func.coalesce(Job.started_at, clock),
        "cancel_requested": False,
    }
    if session.get_bind().dialect.name == "postgresql":
        job_id = session.scalar(_next_queued(models).with_for_update(skip_locked=True))
        if job_id is None:
            session.rollback()
            return None
        where: ColumnElement[bool] = Job.id == job_id
    else:
        where = Job.id == _next_queued(models).scalar_subquery()
    claimed = session.execute(
        update(Job)
        .where(where, Job.status == JobStatus.QUEUED)
        .values(**values)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if claimed is None:
        session.rollback()
        return None
    job = session.get(Job, claimed, populate_existing=True)
    assert job is not None
    add_event(
        session,
        job,
        f"Job started on worker {worker_id}" + (f" (retry {job.attempts})" if job.attempts else ""),
        data={"worker_id": worker_id, "attempts": job.attempts},
    )
    session.commit()
    return job


def _owned(job_id: str, worker_id: str) -> tuple[ColumnElement[bool], ...]:
    return (Job.id == job_id, Job.worker_id == worker_id, Job.status.in_(LEASED_STATUSES))


def heartbeat(
    session: Session,
    job_id: str,
    worker_id: str,
    lease_seconds: float,
    *,
    now: datetime | None = None,
) -> bool:
    """Extend the lease; False if ``worker_id`` no longer holds it."""
    clock = _lease_clock(session, now)
    result = session.execute(
        update(Job)
        .where(*_owned(job_id, worker_id))
        .values(lease_expires_at=clock + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


def report_progress(
    session: Session,
    job_id: str,
    worker_id: str,
    lease_seconds: float,
    *,
    step: int,
    total_steps: int | None = None,
    epoch: float | None = None,
    metrics: dict[str, Any] | None = None,
    trained_tokens: int | None = None,
    estimated_finish: datetime | None = None,
    now: datetime | None = None,
) -> bool:
    """Record progress and extend the lease in one write; False if the lease was lost."""
    clock = _lease_clock(session, now)
    values: dict[str, Any] = {
        "step": step,
        "lease_expires_at": clock + timedelta(seconds=lease_seconds),
    }
    optional = {
        "total_steps": total_steps,
        "epoch": epoch,
        "metrics": metrics,
        "trained_tokens": trained_tokens,
        "estimated_finish": estimated_finish,
    }
    values.update({k: v for k, v in optional.items() if v is not None})
    result = session.execute(
        update(Job)
        .where(*_owned(job_id, worker_id))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


def is_cancel_requested(session: Session, job_id: str) -> bool:
    """One primary-key read; the worker asks before every training step."""
    requested = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    # End the transaction: PostgreSQL would otherwise sit "idle in transaction" and SQLite
    # keep an old snapshot until the worker's next write.
    session.commit()
    return bool(requested)


def requeue_expired(
    session: Session, *, max_attempts: int = 3, now: datetime | None = None
) -> list[str]:
    """Return jobs whose lease expired to the queue; the ids of the requeued jobs.

    ``attempts`` counts expired leases. A job at ``max_attempts`` is failed instead (a job
    that kills its worker every time must not loop forever), and one whose cancel was
    requested is cancelled: its worker is gone, nobody else will honour the request.
    """
    clock = _lease_clock(session, now)
    now = now or utcnow()
    expired = session.execute(
        select(Job.id, Job.status, Job.attempts).where(
            Job.status.in_(LEASED_STATUSES), Job.lease_expires_at < clock
        )
    ).all()
    requeued: list[str] = []
    for job_id, status, attempts in expired:
        attempts += 1
        # No finish estimate survives the worker that made it (outcomes._ended clears it too).
        values: dict[str, Any] = {
            "worker_id": None,
            "lease_expires_at": None,
            "estimated_finish": None,
            "attempts": attempts,
        }
        if status == JobStatus.CANCEL_REQUESTED:
            values |= {"status": JobStatus.CANCELLED, "finished_at": now}
            level, message = "warn", "Worker lost while cancelling; job cancelled"
        elif attempts >= max_attempts:
            values |= {
                "status": JobStatus.FAILED,
                "finished_at": now,
                "error": {
                    "code": "worker_lost",
                    "message": f"The worker running this job stopped responding {attempts} "
                    "times; giving up.",
                    "param": None,
                },
            }
            level, message = "error", f"Worker lost {attempts} times; job failed"
        else:
            values["status"] = JobStatus.QUEUED
            level, message = "warn", f"Worker lost (lease expired); job requeued, retry {attempts}"
        # Same conditions again: a heartbeat or another reaper may have got there first.
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(LEASED_STATUSES), Job.lease_expires_at < clock)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            continue
        job = session.get(Job, job_id, populate_existing=True)
        assert job is not None
        add_event(session, job, message, level=level, data={"attempts": attempts})
        if values["status"] == JobStatus.QUEUED:
            requeued.append(job_id)
    session.commit()
    return requeued


def record_training_plan(
    session: Session,
    job: Job,
    *,
    worker_id: str,
    resolved: dict[str, Any],
    message: str,
    data: dict[str, Any] | None = None,
) -> None:
    """Store what the run resolved (``resolved["total_steps"]`` too) with its event, in one
    transaction, while ``worker_id`` holds the lease; else :class:`LeaseLostError`."""
    touch_owned(
        session,
        job,
        worker_id,
        resolved_hyperparameters=resolved,
        total_steps=resolved["total_steps"],
    )
    add_event(session, job, message, data=data)
    session.commit()


def release_job(session: Session, job: Job, *, worker_id: str, reason: str) -> bool:
    """Give a job back to the queue without counting an attempt (graceful shutdown)."""
    result = session.execute(
        update(Job)
        .where(*_owned(job.id, worker_id), Job.status == JobStatus.RUNNING)
        .values(
            status=JobStatus.QUEUED, worker_id=None, lease_expires_at=None, estimated_finish=None
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return False
    add_event(session, job, f"Job requeued: {reason}", level="warn")
    session.commit()
    return True


# --- the lease fence: writes that apply only while the worker holds the lease ----------------


def touch_owned(session: Session, job: Job, worker_id: str, **values: Any) -> None:
    """Write ``values`` to the job if still leased by ``worker_id``; else roll back and raise."""
    result = session.execute(
        update(Job)
        .where(*_owned(job.id, worker_id))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        raise LeaseLostError(f"worker {worker_id} no longer holds job {job.id}")


def add_owned_event(
    session: Session,
    job: Job,
    *,
    worker_id: str,
    message: str,
    level: EventLevel = "info",
    type: EventType = "message",
    data: dict[str, Any] | None = None,
) -> None:
    """A worker's event, committed only while ``worker_id`` holds the lease.

    The no-op conditional UPDATE takes the job row's write lock before the insert, so a reaper
    that requeues the job commits either before (nothing is written; LeaseLostError) or after.
    Without it a worker stalled past its lease would, on waking, log one more step into a job
    that another worker now runs.
    """
    touch_owned(session, job, worker_id, lease_expires_at=Job.lease_expires_at)
    add_event(session, job, message, level=level, type=type, data=data)
    session.commit()


# --- quota helpers (used at job creation) ----------------------------------------------------


def job_count(
    session: Session, tenant_id: str, statuses: tuple[JobStatus, ...] = ACTIVE_STATUSES
) -> int:
    """The tenant's jobs in ``statuses`` (by default the active ones, that the quotas count)."""
    return (
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.tenant_id == tenant_id, Job.status.in_(statuses))
        )
        or 0
    )
