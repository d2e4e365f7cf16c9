"""A job's outcome, written by the worker that holds its lease: succeeded (the adapter row in
the same transaction), failed or cancelled. Once the lease is gone each writes nothing and
raises :class:`service.jobs.queue.LeaseLostError`."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from service.adapters.records import next_adapter_version
from service.db.models import AdapterRow, Job, JobStatus
from service.db.types import utcnow
from service.jobs.events import add_event
from service.jobs.queue import touch_owned


def _ended(status: JobStatus) -> dict[str, Any]:
    """What every outcome writes beside its own fields: the final status, when, and no lease
    or finish estimate left over."""
    return {
        "status": status,
        "finished_at": utcnow(),
        "lease_expires_at": None,
        "estimated_finish": None,
    }


def _refresh(session: Session, job: Job) -> None:
    """Bring the caller's ``job`` object up to date after an outcome was written."""
    if job in session:
        session.refresh(job)


def finish_success(
    session: Session,
    job: Job,
    adapter_row: AdapterRow,
    *,
    worker_id: str,
    metrics: dict[str, Any] | None = None,
) -> AdapterRow:
    """Insert the adapter and mark the job succeeded, in ONE transaction.

    If the insert fails (e.g. the name was taken meanwhile) everything is rolled back, the
    job stays running, and the ``IntegrityError`` propagates: the worker should then call
    ``finish_failure``. Fields left unset on ``adapter_row`` (tenant, name, version, source
    job, metrics) are filled from the job.
    """
    values = {
        **_ended(JobStatus.SUCCEEDED),
        "fine_tuned_adapter": adapter_row.name or job.adapter_name,
    }
    if metrics is not None:
        values["metrics"] = metrics
    touch_owned(session, job, worker_id, **values)
    try:
        adapter_row.tenant_id = adapter_row.tenant_id or job.tenant_id
        adapter_row.name = adapter_row.name or job.adapter_name
        adapter_row.source_job_id = adapter_row.source_job_id or job.id
        if adapter_row.metrics is None:
            adapter_row.metrics = metrics if metrics is not None else job.metrics
        if adapter_row.version is None:
            adapter_row.version = next_adapter_version(session, job.tenant_id)
        session.add(adapter_row)
        session.flush()
        add_event(
            session,
            job,
            f"Job succeeded: adapter '{adapter_row.name}' version {adapter_row.version}",
            data={"adapter": adapter_row.name, "version": adapter_row.version},
        )
        session.commit()
    except BaseException:
        session.rollback()
        raise
    _refresh(session, job)
    return adapter_row


def finish_failure(
    session: Session,
    job: Job,
    *,
    worker_id: str,
    message: str,
    code: str = "training_failed",
    param: str | None = None,
) -> None:
    touch_owned(
        session,
        job,
        worker_id,
        **_ended(JobStatus.FAILED),
        error={"code": code, "message": message, "param": param},
    )
    add_event(session, job, f"Job failed: {message}", level="error", data={"code": code})
    session.commit()
    _refresh(session, job)


def finish_cancelled(session: Session, job: Job, *, worker_id: str) -> None:
    """Cancel a running job; its event names the step the job's progress stopped at."""
    touch_owned(session, job, worker_id, **_ended(JobStatus.CANCELLED))
    if job.step:
        add_event(
            session,
            job,
            f"Job cancelled at step {job.step}/{job.total_steps}",
            data={"step": job.step, "total_steps": job.total_steps, "epoch": job.epoch},
        )
    else:
        add_event(session, job, "Job cancelled")
    session.commit()
    _refresh(session, job)
