"""A job's resumable checkpoints: a worker saves them under its lease, a requeued job's next
run starts from the newest one that still has its state."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, undefer

from service.db.models import Checkpoint, Job
from service.jobs.events import add_event
from service.jobs.queue import touch_owned


def save_checkpoint(
    session: Session,
    job: Job,
    *,
    worker_id: str,
    step: int,
    state: bytes,
    epoch: float | None = None,
    metrics: dict[str, Any] | None = None,
    keep_states: int = 2,
) -> Checkpoint:
    """Store a resumable checkpoint; older ones keep their metadata but drop their state.

    ``keep_states`` bounds storage: only the newest few checkpoints keep their state blob.
    """
    # Under the lease, and without moving the job's progress: the last progress write sets
    # step, epoch, tokens and metrics together, and a step moved here alone disagreed with the
    # rest until the next one (step 36 beside the epoch and tokens of step 30).
    touch_owned(session, job, worker_id, lease_expires_at=Job.lease_expires_at)
    ckpt = Checkpoint(
        job_id=job.id,
        tenant_id=job.tenant_id,
        step=step,
        epoch=epoch,
        metrics=metrics,
        state=state,
    )
    session.add(ckpt)
    session.flush()
    keep = session.scalars(
        select(Checkpoint.id)
        .where(Checkpoint.job_id == job.id, Checkpoint.state.is_not(None))
        .order_by(Checkpoint.step.desc(), Checkpoint.created_at.desc())
        .limit(max(keep_states, 1))
    ).all()
    session.execute(
        update(Checkpoint)
        .where(
            Checkpoint.job_id == job.id,
            Checkpoint.state.is_not(None),
            Checkpoint.id.not_in(keep),
        )
        .values(state=None)
        .execution_options(synchronize_session=False)
    )
    add_event(
        session,
        job,
        f"Checkpoint saved at step {step}",
        type="checkpoint",
        data={"checkpoint_id": ckpt.id, "step": step, "epoch": epoch},
    )
    session.commit()
    return ckpt


def latest_checkpoint(session: Session, job_id: str) -> Checkpoint | None:
    """The newest checkpoint that still has its state (what a resumed run starts from)."""
    return session.scalar(
        select(Checkpoint)
        .where(Checkpoint.job_id == job_id, Checkpoint.state.is_not(None))
        .order_by(Checkpoint.step.desc(), Checkpoint.created_at.desc())
        .limit(1)
        .options(undefer(Checkpoint.state))
    )
