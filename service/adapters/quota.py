"""Who may add an adapter, and under which name: shared by job creation and adapter import.

An adapter name is taken by an existing adapter *or* by a job that has not finished (the job
will create it); the adapter quota counts those jobs too, or it could be overshot.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db.models import ACTIVE_STATUSES, AdapterRow, Job
from service.errors import quota_exceeded
from service.storage_quota import check_bytes_quota


def name_taken(session: Session, tenant_id: str, name: str) -> str | None:
    """Why ``name`` cannot be used for a new adapter, or None if it is free."""
    if session.scalar(
        select(AdapterRow.id).where(AdapterRow.tenant_id == tenant_id, AdapterRow.name == name)
    ):
        return f"An adapter named '{name}' already exists."
    job_id = session.scalar(
        select(Job.id).where(
            Job.tenant_id == tenant_id,
            Job.adapter_name == name,
            Job.status.in_(ACTIVE_STATUSES),
        )
    )
    if job_id:
        return f"Job {job_id} is already training an adapter named '{name}'."
    return None


def check_adapter_quota(
    session: Session, tenant_id: str, max_adapters: int, active_jobs: int
) -> None:
    """A quota error unless one more adapter fits beside the tenant's adapters and active jobs."""
    adapters = (
        session.scalar(
            select(func.count()).select_from(AdapterRow).where(AdapterRow.tenant_id == tenant_id)
        )
        or 0
    )
    if adapters + active_jobs >= max_adapters:
        raise quota_exceeded(
            f"This tenant has {adapters} adapters and {active_jobs} jobs in progress (limit "
            f"{max_adapters} adapters); delete some adapters first.",
            "adapter_limit",
        )


def check_adapter_bytes_quota(session: Session, tenant_id: str, limit: int, incoming: int) -> None:
    """A quota error unless ``incoming`` more weight bytes fit under the tenant's ``limit``.

    A job passes 0 (its adapter's size is known only once trained): it is refused once the
    limit is reached, and its adapter is then stored whatever its size.
    """
    check_bytes_quota(
        session,
        AdapterRow.size_bytes,
        tenant_id,
        incoming=incoming,
        limit=limit,
        what="adapters",
        code="adapter_bytes_limit",
    )
