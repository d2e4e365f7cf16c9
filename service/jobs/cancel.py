"""Cancelling a fine-tuning job: queued jobs stop at once, running ones at their next step.

The transitions are conditional updates, not read-then-write: a worker may claim the job
between the caller's read and the write, and the update that matches decides.
"""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from service.db.models import Job, JobStatus
from service.db.types import utcnow
from service.errors import conflict
from service.jobs.events import add_event


def _transition(session: Session, job: Job, from_: list[JobStatus], **values: object) -> bool:
    result = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.in_(from_))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def cancel_job(session: Session, job: Job) -> None:
    """Cancel ``job`` (or ask its worker to stop), commit, and refresh ``job``.

    Asking twice is fine; cancelling a finished job (a cancelled one included) is a conflict.
    """
    changed = _transition(
        session,
        job,
        [JobStatus.QUEUED, JobStatus.VALIDATING_FILES],
        status=JobStatus.CANCELLED,
        finished_at=utcnow(),
        cancel_requested=True,
    )
    if changed:
        add_event(session, job, "Job cancelled before it started")
    else:
        changed = _transition(
            session,
            job,
            [JobStatus.RUNNING],
            status=JobStatus.CANCEL_REQUESTED,
            cancel_requested=True,
        )
        if changed:
            add_event(session, job, "Cancellation requested; the job stops at its next step")
    session.commit()
    session.refresh(job)
    if changed or job.status == JobStatus.CANCEL_REQUESTED:
        return
    raise conflict(
        f"Job {job.id} is {job.status}; only queued or running jobs can be cancelled.",
        None,
        "job_not_cancellable",
    )
