"""FastAPI dependencies: settings, database session, the caller's identity."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from service.api.errors import AUTHENTICATION, PERMISSION, ApiError, unavailable
from service.config import Settings
from service.db.models import Tenant
from service.tenants.keys import key_by_secret

if TYPE_CHECKING:  # core imports torch; the API imports it only through the lifespan hooks
    from core.base import BaseModel as CoreBaseModel


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_sessionmaker(request: Request) -> sessionmaker[Session]:
    factory: sessionmaker[Session] = request.app.state.sessionmaker
    return factory


SessionFactoryDep = Annotated[sessionmaker[Session], Depends(get_sessionmaker)]


def get_session(factory: SessionFactoryDep) -> Iterator[Session]:
    # Routes commit explicitly; anything uncommitted is rolled back when the session closes.
    with factory() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


# --- authentication --------------------------------------------------------------------------

_bearer = HTTPBearer(
    auto_error=False,
    description="An API key (`lpx_...`) sent as `Authorization: Bearer <key>`.",
)


@dataclass(frozen=True)
class Principal:
    """Who is calling. ``tenant_id`` is None for the environment admin key."""

    tenant_id: str | None
    key_id: str | None
    is_admin: bool


def _unauthorized(message: str, code: str) -> ApiError:
    return ApiError(401, message, AUTHENTICATION, None, code, {"WWW-Authenticate": "Bearer"})


def get_principal(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if settings.auth_disabled:
        # Loopback-only development mode (enforced by Settings): the default tenant, with
        # admin rights, whatever the request sends.
        return Principal(request.app.state.default_tenant_id, None, True)
    if credentials is None or not credentials.credentials:
        raise _unauthorized(
            "Missing API key. Send it as 'Authorization: Bearer <key>'.", "missing_api_key"
        )
    secret = credentials.credentials
    admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
    if admin_key and hmac.compare_digest(secret.encode(), admin_key.encode()):
        return Principal(None, None, True)
    key = key_by_secret(session, secret)
    if key is None:
        raise _unauthorized("Incorrect API key provided.", "invalid_api_key")
    if key.revoked_at is not None:
        raise _unauthorized("This API key has been revoked.", "revoked_api_key")
    return Principal(key.tenant_id, key.id, key.is_admin)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def get_current_tenant(principal: PrincipalDep, session: SessionDep) -> Tenant:
    if principal.tenant_id is None:
        raise ApiError(
            403,
            "The admin key manages tenants only; use a tenant's API key here.",
            PERMISSION,
            None,
            "tenant_key_required",
        )
    tenant = session.get(Tenant, principal.tenant_id)
    if tenant is None:  # key outlived its tenant
        raise _unauthorized("Incorrect API key provided.", "invalid_api_key")
    return tenant


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]


def require_admin(principal: PrincipalDep) -> Principal:
    if not principal.is_admin:
        raise ApiError(403, "This endpoint needs an admin key.", PERMISSION, None, "admin_required")
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]


# --- the loaded base model ---------------------------------------------------------------------


def get_base_model(request: Request) -> CoreBaseModel:
    """The encoder the serving lifespan hook loaded; 503 until it has (or without the hook)."""
    base: CoreBaseModel | None = getattr(request.app.state, "base_model", None)
    if base is None:
        raise unavailable(
            "The base model is still loading; retry shortly.", "model_not_ready", retry_after=5
        )
    return base
