"""``/v1/adapters``: list, get and delete adapter metadata (never the weights)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.api.deps import CurrentTenant, SessionDep
from service.api.errors import not_found
from service.api.pagination import DEFAULT_LIMIT, AfterQuery, LimitQuery, keyset_page
from service.api.schemas.adapters import AdapterObject
from service.api.schemas.common import DeletedResponse, ListResponse
from service.db.models import Adapter

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])


class AdapterDeleted(DeletedResponse):
    name: str
    version: int


def _get_owned(session: Session, tenant_id: str, name: str) -> Adapter:
    # Adapter.weights is deferred: metadata queries never read the blob.
    row = session.scalar(
        select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
    )
    if row is None:
        raise not_found("adapter", name)
    return row


@router.get("", response_model=ListResponse[AdapterObject])
def list_adapters(
    session: SessionDep,
    tenant: CurrentTenant,
    after: AfterQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
) -> ListResponse[AdapterObject]:
    """Newest first; ``after`` is the name of the last adapter of the previous page."""
    rows, has_more = keyset_page(
        session,
        Adapter,
        [Adapter.tenant_id == tenant.id],
        after=after,
        limit=limit,
        cursor_column=Adapter.name,
    )
    data = [AdapterObject.from_row(r) for r in rows]
    return ListResponse(
        data=data,
        has_more=has_more,
        first_id=data[0].name if data else None,
        last_id=data[-1].name if data else None,
    )


@router.get("/{name}", response_model=AdapterObject)
def get_adapter(name: str, session: SessionDep, tenant: CurrentTenant) -> AdapterObject:
    return AdapterObject.from_row(_get_owned(session, tenant.id, name))


@router.delete("/{name}", response_model=AdapterDeleted)
def delete_adapter(name: str, session: SessionDep, tenant: CurrentTenant) -> AdapterDeleted:
    """Delete an adapter. Serving caches key on (tenant, name, version) and versions are never
    reused, so a cached copy can never be mistaken for a later adapter of the same name."""
    row = _get_owned(session, tenant.id, name)
    deleted = AdapterDeleted(id=row.id, object="adapter", name=row.name, version=row.version)
    session.delete(row)
    session.commit()
    return deleted
