"""A tenant's stored adapters: finding one, numbering a new one, deleting one.

Shared by ``/v1/adapters`` and ``/v1/models`` (two faces of the same rows), the import
workflow and the worker. Lookups return None for a missing adapter (another tenant's
included, whose existence is never confirmed); the caller says what is missing in its words.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from sqlalchemy import select, update
from sqlalchemy.orm import Session, undefer

from service.db.models import AdapterRow, Tenant
from service.db.session import reclaim_free_pages

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
) -> None:
    """Delete and commit ``row``, then tell each of ``forget`` to drop what it holds of it.

    Serving caches key on (tenant, name, version) and versions are never reused, so even
    before the drop a cached copy cannot be served for a later adapter of the same name;
    the drop frees its memory.
    """
    tenant_id, name = row.tenant_id, row.name
    session.delete(row)
    session.commit()
    reclaim_free_pages(session)
    for drop in forget:
        drop(tenant_id, name)
