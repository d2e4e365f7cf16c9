"""A job's resumable checkpoints: a worker saves them under its lease, a requeued job's next
run starts from the newest one that still has its state.

A checkpoint that still has its state is also a model, as OpenAI's
``fine_tuned_model_checkpoint``: ``<adapter name>:ckpt-step-<step>`` (:func:`checkpoint_model`)
names the checkpoint of that step of the tenant's most recent job training that adapter name
(a name retrained by a later job names the later job's checkpoints), served as the adapter its
weights make (:func:`core.training.checkpoint.adapter_from_checkpoint`).
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Connection, LargeBinary, bindparam, func, select, update
from sqlalchemy.orm import Session, undefer

from service.db.models import TERMINAL_STATUSES, Checkpoint, Job
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
    # A message, as OpenAI announces its checkpoints (the SDK's event types are message and
    # metrics); programs find the checkpoint in data.
    add_event(
        session,
        job,
        f"Checkpoint created at step {step}",
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


# --- a checkpoint as a model -------------------------------------------------------------------

# An adapter name (service.api.schemas.common.NAME_PATTERN, at most 64 characters), then the
# step as the checkpoint object writes it: no sign, no leading zero, at most 10 digits (the
# column is a 32-bit integer). Matched whole; nothing else is a checkpoint's model name.
_CHECKPOINT_MODEL = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]{0,63}):ckpt-step-(0|[1-9][0-9]{0,9})")
_MAX_STEP = 2**31 - 1
CHECKPOINT_MODEL_MAX_LENGTH = 64 + len(":ckpt-step-") + len(str(_MAX_STEP))
# Leading bytes of a state read for its JSON part: most checkpoints' JSON fits (the RNG states
# and the history are most of it); a longer one costs a second read of exactly its length.
_META_READ_BYTES = 64 << 10
# Past this the length is no trainer's (a history of ~80,000 evaluations): not read.
_META_MAX_BYTES = 16 << 20


def checkpoint_model(adapter_name: str, step: int) -> str:
    """The model name of a job's checkpoint (OpenAI's ``fine_tuned_model_checkpoint``)."""
    return f"{adapter_name}:ckpt-step-{step}"


def parse_checkpoint_model(name: str) -> tuple[str, int] | None:
    """``(adapter name, step)`` of a checkpoint's model name; None for any other name."""
    match = _CHECKPOINT_MODEL.fullmatch(name)
    if match is None or int(match[2]) > _MAX_STEP:
        return None
    return match[1], int(match[2])


_LATEST_JOB = (
    select(Job.id)
    .where(Job.tenant_id == bindparam("tenant_id"), Job.adapter_name == bindparam("adapter"))
    .order_by(Job.created_at.desc(), Job.id.desc())
    .limit(1)
    .scalar_subquery()
)
_FIND_SERVED = (
    select(
        Checkpoint.id,
        func.substr(Checkpoint.state, 1, _META_READ_BYTES, type_=LargeBinary).label("prefix"),
    )
    .where(
        Checkpoint.job_id == _LATEST_JOB,
        Checkpoint.tenant_id == bindparam("tenant_id"),
        Checkpoint.step == bindparam("step"),
        Checkpoint.state.is_not(None),
    )
    # A step saved twice (a requeued job checkpointed again where it stopped): the same
    # weights, resume being bit-exact; the newer is taken.
    .order_by(Checkpoint.created_at.desc(), Checkpoint.id.desc())
    .limit(1)
)


def find_served_checkpoint(
    conn: Connection, tenant_id: str, adapter_name: str, step: int
) -> tuple[str, dict[str, Any]] | None:
    """The id and adapter config (``Adapter.config_dict()``'s shape) of the checkpoint
    ``checkpoint_model(adapter_name, step)`` names in the tenant, read from its state's JSON
    part; None if there is none, its state was dropped, or it cannot be served (saved before
    checkpoints described their adapter)."""
    from core.training.checkpoint import (
        CheckpointError,
        checkpoint_adapter_config,
        meta_size,
        read_meta,
    )

    params = {"tenant_id": tenant_id, "adapter": adapter_name, "step": step}
    row = conn.execute(_FIND_SERVED, params).one_or_none()
    if row is None:
        return None
    prefix = bytes(row.prefix)
    try:
        size = meta_size(prefix)
        if size > _META_MAX_BYTES:
            return None
        if size > len(prefix):
            longer = conn.execute(
                select(func.substr(Checkpoint.state, 1, size, type_=LargeBinary)).where(
                    Checkpoint.id == row.id
                )
            ).scalar()
            if longer is None:  # its state dropped (or its job deleted) meanwhile
                return None
            prefix = bytes(longer)
        return row.id, checkpoint_adapter_config(read_meta(prefix))
    except CheckpointError:
        return None


def drop_served_checkpoints(session: Session, tenant_id: str, adapter_name: str) -> None:
    """Drop the states of the checkpoints of the tenant's finished jobs that trained
    ``adapter_name`` (joins the caller's transaction): with the adapter deleted, its
    checkpoints' model names must stop serving too, and their bytes go. A job not finished
    keeps its states, which it resumes from."""
    finished = select(Job.id).where(
        Job.tenant_id == tenant_id,
        Job.adapter_name == adapter_name,
        Job.status.in_(TERMINAL_STATUSES),
    )
    session.execute(
        update(Checkpoint)
        .where(
            Checkpoint.tenant_id == tenant_id,
            Checkpoint.job_id.in_(finished),
            Checkpoint.state.is_not(None),
        )
        .values(state=None)
        .execution_options(synchronize_session=False)
    )


def withdraw_checkpoint(session: Session, tenant_id: str, checkpoint_id: str) -> bool:
    """Drop the state of the tenant's checkpoint ``checkpoint_id`` (joins the caller's
    transaction), so it stops serving as a model, if its job has finished; False, dropping
    nothing, while the job may still resume from it."""
    status = session.scalar(
        select(Job.status)
        .join(Checkpoint, Checkpoint.job_id == Job.id)
        .where(Checkpoint.id == checkpoint_id, Checkpoint.tenant_id == tenant_id)
    )
    if status not in TERMINAL_STATUSES:
        return False
    session.execute(
        update(Checkpoint)
        .where(Checkpoint.id == checkpoint_id)
        .values(state=None)
        .execution_options(synchronize_session=False)
    )
    return True


def served_checkpoint_state(session: Session, tenant_id: str, checkpoint_id: str) -> bytes | None:
    """The state of the tenant's checkpoint ``checkpoint_id``, or None once it is dropped (or
    the job deleted)."""
    return session.scalar(
        select(Checkpoint.state).where(
            Checkpoint.id == checkpoint_id, Checkpoint.tenant_id == tenant_id
        )
    )
