"""``/v1/tenants``: admin-only management of tenants and their API keys."""

from __future__ import annotations

from fastapi import APIRouter, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.api.deps import AdminDep, SessionDep
from service.api.pagination import DEFAULT_LIMIT, AfterQuery, LimitQuery, keyset_page
from service.api.params import KeyId, TenantId
from service.api.schemas.common import DeletedResponse, ListResponse
from service.api.schemas.tenants import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyObject,
    TenantCreate,
    TenantCreated,
    TenantObject,
)
from service.db.models import ApiKey, Tenant
from service.errors import not_found
from service.state import app_state
from service.tenants.keys import NewKey, create_api_key, create_tenant_with_key, revoke_key

router = APIRouter(prefix="/v1/tenants", tags=["tenants (admin)"])


def _created_key(new_key: NewKey) -> ApiKeyCreated:
    return ApiKeyCreated(**ApiKeyObject.from_row(new_key.row).model_dump(), key=new_key.secret)


def _get_tenant(session: Session, tenant_id: str) -> Tenant:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise not_found("tenant", tenant_id)
    return tenant


@router.post("", response_model=TenantCreated, summary="Create a tenant")
def create_tenant_route(body: TenantCreate, session: SessionDep, _admin: AdminDep) -> TenantCreated:
    """Admin only. Creates a tenant and its first API key (named `initial`); the key's secret
    is in the answer and never shown again. 409 when the name is taken."""
    tenant, new_key = create_tenant_with_key(session, body.name, "initial")
    return TenantCreated(
        **TenantObject.from_row(tenant).model_dump(), api_key=_created_key(new_key)
    )


@router.get("", response_model=ListResponse[TenantObject], summary="List tenants")
def list_tenants(
    session: SessionDep,
    _admin: AdminDep,
    after: AfterQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
) -> ListResponse[TenantObject]:
    """Admin only. Every tenant, newest first, one page at a time."""
    rows, has_more = keyset_page(session, Tenant, [], after=after, limit=limit)
    data = [TenantObject.from_row(r) for r in rows]
    return ListResponse.page(data, has_more)


@router.post("/{tenant_id}/keys", response_model=ApiKeyCreated, summary="Create an API key")
def create_key(
    tenant_id: TenantId, body: ApiKeyCreate, session: SessionDep, _admin: AdminDep
) -> ApiKeyCreated:
    """Admin only. A new key for the tenant; its secret is in the answer and never shown
    again."""
    tenant = _get_tenant(session, tenant_id)
    new_key = create_api_key(session, tenant, is_admin=body.is_admin, name=body.name)
    session.commit()
    return _created_key(new_key)


@router.get(
    "/{tenant_id}/keys", response_model=ListResponse[ApiKeyObject], summary="List a tenant's keys"
)
def list_keys(
    tenant_id: TenantId,
    session: SessionDep,
    _admin: AdminDep,
    after: AfterQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
) -> ListResponse[ApiKeyObject]:
    """Admin only. The tenant's keys, newest first, revoked ones included, without their
    secrets (only the visible prefix)."""
    _get_tenant(session, tenant_id)
    rows, has_more = keyset_page(
        session, ApiKey, [ApiKey.tenant_id == tenant_id], after=after, limit=limit
    )
    data = [ApiKeyObject.from_row(r) for r in rows]
    return ListResponse.page(data, has_more)


@router.delete(
    "/{tenant_id}/keys/{key_id}", response_model=DeletedResponse, summary="Revoke an API key"
)
def revoke_key_route(
    request: Request, tenant_id: TenantId, key_id: KeyId, session: SessionDep, _admin: AdminDep
) -> DeletedResponse:
    """Admin only. The key stops working at once; it stays listed, with `revoked_at` set,
    for the audit trail."""
    key = session.scalar(select(ApiKey).where(ApiKey.id == key_id, ApiKey.tenant_id == tenant_id))
    if key is None:
        raise not_found("api_key", key_id)
    revoke_key(key)
    session.commit()
    lookups = app_state(request).lookup_cache
    if lookups is not None:
        lookups.drop_key(key.id)
    return DeletedResponse(id=key.id, object="api_key")
