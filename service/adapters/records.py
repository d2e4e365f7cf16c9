"""A tenant's stored adapters: finding one, numbering a new one, deleting one.

Shared by ``/v1/adapters`` and ``/v1/models`` (two faces of the same rows), the import
workflow and the worker. Lookups return None for a missing adapter (another tenant's
included, whose existence is never confirmed); the caller says what is missing in its words.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, undefer

from service.db.models import ACTIVE_STATUSES, AdapterRow, Job, Tenant
from service.db.session import reclaim_free_pages
from service.errors import conflict
from service.jobs.checkpoints import drop_served_checkpoints
from service.tenants.lock import lock_tenant

# Told (tenant id, adapter name) after a delete commits: what serving holds of it must go.
ForgetAdapter = Callable[[str, str], None]


def find_adapter_row(
    session: Session, tenant_id: str, name: str, *, weights: bool = False
) -> AdapterRow | None:
    """The tenant's adapter called ``name``; its weights are loaded only if asked for."""
    # AdapterRow.weights is deferred: metadata queries never read the blob.
    stmt = select(AdapterRow).where(AdapterRow.tenant_id == tenant_id, AdapterRow.name == name)
    if weights:
        stmt = stmt.options(undefer(AdapterRow.weights))
    return session.scalar(stmt)


def next_adapter_version(session: Session, tenant_id: str) -> int:
    """Bump and return the tenant's adapter counter (joins the caller's transaction)."""
    version = session.execute(
        update(Tenant)
        .where(Tenant.id == tenant_id)
        .values(adapter_seq=Tenant.adapter_seq + 1)
        .returning(Tenant.adapter_seq)
        .execution_options(synchronize_session=False)
    ).scalar_one()
    return int(version)


def delete_adapter_row(
    session: Session, row: AdapterRow, forget: Iterable[ForgetAdapter] = ()
) -> bool:
    """Delete and commit ``row``, then tell each of ``forget`` to drop what it holds of it;
    a conflict while a job that has not finished starts from it. False where another request
    deleted it first (both had read it: each answered 200).

    Serving caches key on (tenant, name, version) and versions are never reused, so even
    before the drop a cached copy cannot be served for a later adapter of the same name;
    the drop frees its memory.
    """
    tenant_id, name = row.tenant_id, row.name
    # Against a job created at the same time that pins it (job creation holds this lock to
    # its commit), as for a dataset (service.datasets.store.delete_owned_dataset).
    lock_tenant(session, tenant_id)
    # A job not yet finished may start from this adapter (a DPO job's reference_adapter,
    # pinned by id): deleting it would fail that job later, as deleting its dataset would.
    # The tenant's active jobs are few (its quotas bound them), so they are read whole.
    active = session.scalars(
        select(Job).where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE_STATUSES))
    )
    user = next((job.id for job in active if job.method.get("reference_adapter") == row.id), None)
    if user is not None:
        raise conflict(
            f"Adapter '{name}' is the reference_adapter of job {user}, which has not finished.",
            None,
            "adapter_in_use",
        )
    gone = session.execute(delete(AdapterRow).where(AdapterRow.id == row.id))
    if not gone.rowcount:  # type: ignore[attr-defined]
        session.rollback()
        return False
    # Its jobs' checkpoints are models too ('<name>:ckpt-step-N'): a deleted adapter stops
    # being served under those names as well.
    drop_served_checkpoints(session, tenant_id, name)
    session.commit()
    reclaim_free_pages(session)
    for drop in forget:
        drop(tenant_id, name)
    return True
