"""``/v1/fine_tuning/jobs``: create, list, get, events, checkpoints, cancel."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.api.deps import CurrentTenant, SessionDep, SettingsDep
from service.api.pagination import DEFAULT_LIMIT, AfterQuery, LimitQuery, keyset_page
from service.api.params import JobId
from service.api.schemas.common import ListResponse
from service.api.schemas.job_events import CheckpointObject, JobEventObject, parse_event_id
from service.api.schemas.jobs import JobCreate, JobObject
from service.db.models import Checkpoint, Job, JobEvent
from service.errors import invalid, not_found
from service.jobs.cancel import cancel_job
from service.jobs.create import create_job
from service.names import NoControlCharacters

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])


def _get_owned(session: Session, tenant_id: str, job_id: str) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))
    if job is None:
        raise not_found("job", job_id)
    return job


@router.post("", response_model=JobObject, summary="Create a fine-tuning job")
def create_fine_tuning_job(
    body: JobCreate, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep
) -> JobObject:
    """Queues a job that trains a new adapter on the base model. The training (and
    validation) file is checked against the method before this returns (its kind, labels,
    planned steps, and that a `validation_fraction` sent holds out a row; the default's, on a
    file too small for it, validates nothing); it then runs on a worker, which encodes the
    rows: a file that fails there fails the job with `invalid_training_data`, as OpenAI fails
    a job whose file does not validate.
    Follow it with the events or their stream. OpenAI's request shape (method types
    `supervised` and `dpo`, top-level hyperparameters) is accepted too."""
    return JobObject.from_row(create_job(session, tenant, body.job_request(), settings))


@router.get("", response_model=ListResponse[JobObject], summary="List fine-tuning jobs")
def list_fine_tuning_jobs(
    request: Request,
    session: SessionDep,
    tenant: CurrentTenant,
    after: AfterQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
    training_file: Annotated[
        str | None,
        Query(max_length=64, description="Only jobs trained on this dataset."),
        NoControlCharacters,  # no id has one (service.names)
    ] = None,
) -> ListResponse[JobObject]:
    """The caller's jobs, newest first, one page at a time. OpenAI's `metadata[key]=value`
    filters match no job: loraplex refuses jobs with metadata."""
    if any(key.startswith("metadata[") for key in request.query_params):
        # Dropped silently, the filter listed every job (as FastAPI ignores unknown keys).
        return ListResponse.page([], False)
    where = [Job.tenant_id == tenant.id]
    if training_file is not None:
        where.append(Job.training_file == training_file)
    rows, has_more = keyset_page(session, Job, where, after=after, limit=limit)
    data = [JobObject.from_row(r) for r in rows]
    return ListResponse.page(data, has_more)


@router.get("/{job_id}", response_model=JobObject, summary="Get a fine-tuning job")
def get_fine_tuning_job(job_id: JobId, session: SessionDep, tenant: CurrentTenant) -> JobObject:
    """A job's status, progress, hyperparameters and metrics."""
    return JobObject.from_row(_get_owned(session, tenant.id, job_id))


@router.get(
    "/{job_id}/events",
    response_model=ListResponse[JobEventObject],
    summary="List a job's events",
)
def list_fine_tuning_events(
    job_id: JobId,
    session: SessionDep,
    tenant: CurrentTenant,
    after: AfterQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
    order: Annotated[Literal["desc", "asc"], Query(description="desc = newest first")] = "desc",
) -> ListResponse[JobEventObject]:
    """A job's events (status changes, metrics, checkpoints), newest first as OpenAI lists
    them; `order=asc` suits a client tailing a job."""
    job = _get_owned(session, tenant.id, job_id)
    stmt = select(JobEvent).where(JobEvent.job_id == job.id)
    if after is not None:
        cursor = parse_event_id(after)
        if cursor is None:
            raise invalid(f"Unknown cursor '{after}'.", "after", "invalid_cursor")
        stmt = stmt.where(JobEvent.id < cursor if order == "desc" else JobEvent.id > cursor)
    stmt = stmt.order_by(JobEvent.id.desc() if order == "desc" else JobEvent.id.asc())
    rows = list(session.scalars(stmt.limit(limit + 1)))
    data = [JobEventObject.from_row(r) for r in rows[:limit]]
    return ListResponse.page(data, len(rows) > limit)


@router.get(
    "/{job_id}/checkpoints",
    response_model=ListResponse[CheckpointObject],
    summary="List a job's checkpoints",
)
def list_fine_tuning_checkpoints(
    job_id: JobId,
    session: SessionDep,
    tenant: CurrentTenant,
    after: AfterQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
) -> ListResponse[CheckpointObject]:
    """The checkpoints a running or finished job saved, newest first, with the validation
    metrics at each."""
    job = _get_owned(session, tenant.id, job_id)
    rows, has_more = keyset_page(
        session, Checkpoint, [Checkpoint.job_id == job.id], after=after, limit=limit
    )
    data = [CheckpointObject.from_row(r, job.adapter_name) for r in rows]
    return ListResponse.page(data, has_more)


@router.post("/{job_id}/cancel", response_model=JobObject, summary="Cancel a fine-tuning job")
def cancel_fine_tuning_job(job_id: JobId, session: SessionDep, tenant: CurrentTenant) -> JobObject:
    """A queued job is cancelled at once; a running one is asked to stop at its next step
    (status `cancel_requested`, then `cancelled`). Asking again is harmless; 409 for a job
    that has already finished."""
    job = _get_owned(session, tenant.id, job_id)
    cancel_job(session, job)
    return JobObject.from_row(job)
