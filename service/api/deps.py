"""FastAPI dependencies: settings, database session, the caller's identity.

FastAPI runs a plain ``def`` dependency in a worker thread; dependencies that only read
the app's state are ``async def`` so they cost no thread hop. Database work stays in threads,
and the inference routes resolve caller, tenant and adapter in one hop (:func:`get_served_adapter`):
on the hot path every hop and every pooled-connection checkout shows up in the throughput.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from service.adapters.records import ForgetAdapter
from service.config import Settings
from service.db.models import ApiKey, Tenant
from service.errors import ErrorKind, ServiceError
from service.jobs.checkpoints import CHECKPOINT_MODEL_MAX_LENGTH
from service.names import NoControlCharacters, has_control_characters
from service.serving.lookups import LookupCache
from service.serving.queries import AdapterRef, KeyLookup, find_adapter, find_key_and_adapter
from service.state import AppState, app_state
from service.tenants.keys import hash_api_key, key_by_secret

logger = logging.getLogger(__name__)


async def get_state(request: Request) -> AppState:
    return app_state(request)


StateDep = Annotated[AppState, Depends(get_state)]


async def get_settings(state: StateDep) -> Settings:
    return state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


async def get_sessionmaker(state: StateDep) -> sessionmaker[Session]:
    return state.sessionmaker


SessionFactoryDep = Annotated[sessionmaker[Session], Depends(get_sessionmaker)]


def get_session(factory: SessionFactoryDep) -> Iterator[Session]:
    # Routes commit explicitly; anything uncommitted is rolled back when the session closes.
    session = factory()
    try:
        yield session
    finally:
        try:
            session.close()
        except DBAPIError as exc:
            # The connection was lost after the route's work: a read's open transaction
            # cannot be rolled back, nor need be (the pool drops the connection). Raised
            # here, after the answer has started, no handler could answer: the client's
            # connection dropped.
            logger.warning("closing a request's database session failed: %s", exc)


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


def _unauthorized(message: str, code: str) -> ServiceError:
    return ServiceError(message, code=code, kind=ErrorKind.UNAUTHENTICATED)


def _invalid_key() -> ServiceError:
    # Also for a key whose tenant is gone: nothing tells a caller which keys once existed.
    return _unauthorized("Incorrect API key provided.", "invalid_api_key")


BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _without_database(
    request: Request, settings: Settings, credentials: HTTPAuthorizationCredentials | None
) -> Principal | str:
    """The principal when no key lookup is needed, else the presented secret."""
    if settings.auth_disabled:
        # Loopback-only development mode (enforced by Settings): the default tenant, with
        # admin rights, whatever the request sends.
        return Principal(app_state(request).default_tenant_id, None, True)
    if credentials is None or not credentials.credentials:
        raise _unauthorized(
            "Missing API key. Send it as 'Authorization: Bearer <key>'.", "missing_api_key"
        )
    secret = credentials.credentials
    admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
    if admin_key and hmac.compare_digest(secret.encode(), admin_key.encode()):
        return Principal(None, None, True)
    return secret


def _principal_of(key: ApiKey | KeyLookup | None) -> Principal:
    if key is None:
        raise _invalid_key()
    if key.revoked_at is not None:
        raise _unauthorized("This API key has been revoked.", "revoked_api_key")
    return Principal(key.tenant_id, key.id, key.is_admin)


def get_principal(
    request: Request, session: SessionDep, settings: SettingsDep, credentials: BearerDep
) -> Principal:
    found = _without_database(request, settings, credentials)
    if isinstance(found, Principal):
        return found
    return _principal_of(key_by_secret(session, found))


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def _tenant_key_required() -> ServiceError:
    return ServiceError(
        "The admin key manages tenants only; use a tenant's API key here.",
        code="tenant_key_required",
        kind=ErrorKind.FORBIDDEN,
    )


def _tenant_id(principal: Principal) -> str:
    if principal.tenant_id is None:
        raise _tenant_key_required()
    return principal.tenant_id


def get_current_tenant(principal: PrincipalDep, session: SessionDep) -> Tenant:
    tenant = session.get(Tenant, _tenant_id(principal))
    if tenant is None:  # key outlived its tenant
        raise _invalid_key()
    return tenant


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]


async def get_caller_tenant_id(
    request: Request, settings: SettingsDep, credentials: BearerDep
) -> str | None:
    """The caller's tenant id (None for the admin key), from one short thread hop whose
    connection goes back to the pool at once: for routes that keep the request open long
    (generation streams), where a session held as a dependency would hold it throughout."""
    found = _without_database(request, settings, credentials)
    if isinstance(found, Principal):
        return found.tenant_id
    return await run_in_threadpool(_tenant_of_secret, request, found)


def _tenant_of_secret(request: Request, secret: str) -> str | None:
    with app_state(request).sessionmaker() as session:
        principal = _principal_of(key_by_secret(session, secret))
        if principal.tenant_id is not None and session.get(Tenant, principal.tenant_id) is None:
            raise _invalid_key()  # key outlived its tenant
        return principal.tenant_id


CallerTenantId = Annotated[str | None, Depends(get_caller_tenant_id)]


async def get_long_request_tenant_id(
    request: Request, settings: SettingsDep, credentials: BearerDep
) -> str:
    """The caller's tenant id (a tenant key required), checked like :data:`CurrentTenant`
    but holding no connection after: for routes that keep their request open long, reading
    their body at the pace the client sends it (uploads) or streaming (generation). Held
    through an upload, a dependency's session kept a pooled connection per slow client, and
    a few dozen of them stalled every other tenant's requests on the pool
    (``tests/service/api/test_slow_uploads.py``)."""
    tenant_id = await get_caller_tenant_id(request, settings, credentials)
    if tenant_id is None:
        raise _tenant_key_required()
    return tenant_id


LongRequestTenantId = Annotated[str, Depends(get_long_request_tenant_id)]


async def caller_tenant_id(request: Request) -> str | None:
    """:data:`CallerTenantId` for a route that needs it on one path only (a dependency would
    cost every request of the route the lookup)."""
    credentials = await _bearer(request)
    return await get_caller_tenant_id(request, app_state(request).settings, credentials)


async def require_admin(principal: PrincipalDep) -> Principal:
    if not principal.is_admin:
        raise ServiceError(
            "This endpoint needs an admin key.", code="admin_required", kind=ErrorKind.FORBIDDEN
        )
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]


def adapter_caches(state: StateDep) -> list[ForgetAdapter]:
    """What serving holds of adapters, to be told of a delete: lookups and resident copies."""
    forget: list[ForgetAdapter] = []
    if state.lookup_cache is not None:
        forget.append(state.lookup_cache.drop_adapter)
    if state.batcher is not None:  # set by the serving hook only
        forget.append(state.batcher.invalidate)
    for server in (state.generation or {}).values():  # the decoders' generation banks
        forget.append(server.forget)
    for scorer in (state.decoder_scoring or {}).values():  # the decoders' resident heads
        forget.append(scorer.invalidate)
    return forget


AdapterCachesDep = Annotated[list[ForgetAdapter], Depends(adapter_caches)]


# --- the adapter an inference request names ----------------------------------------------------


AdapterName = Annotated[
    str,
    Query(
        min_length=1,
        max_length=CHECKPOINT_MODEL_MAX_LENGTH,
        description="adapter name, or a job checkpoint's `fine_tuned_model_checkpoint` "
        "(`<adapter name>:ckpt-step-<step>`)",
    ),
    NoControlCharacters,  # no name has one (service.names)
]


async def get_served_adapter(
    request: Request, settings: SettingsDep, credentials: BearerDep
) -> AdapterRef | None:
    """Caller, tenant and the adapter's current version: one thread hop, one query, or none.

    None when the caller's tenant has no such adapter (another tenant's is never confirmed
    to exist): the route answers 404 once FastAPI has validated parameters and body, so the
    error order stays that of every route: 401, then 422, then 404. That is also why
    ``adapter`` is read here rather than declared (a declared parameter is validated before
    the caller is checked); routes declare it as :data:`AdapterName`. The connection goes
    back to the pool before the request waits on the batcher: holding it during that wait
    would let a burst of requests starve the adapter loads they wait for. Where the lookup
    cache is on (:mod:`service.serving.lookups`), a caller and adapter already found valid
    cost neither the hop nor the query.
    """
    found = _without_database(request, settings, credentials)
    name = request.query_params.get("adapter", "")
    if has_control_characters(name):
        # No adapter is named so, and PostgreSQL refuses a NUL in a query: the caller alone
        # is looked up, and AdapterName's 422 follows.
        name = ""
    if isinstance(found, Principal):  # the admin key or auth disabled: no key to look up
        return await run_in_threadpool(_find_adapter_for, request, found, name)
    key_hash = hash_api_key(found)
    cache = app_state(request).lookup_cache
    ref = cache.get(key_hash, name) if cache is not None else None
    if ref is not None:
        return ref
    return await run_in_threadpool(_look_up_served_adapter, request, key_hash, name, cache)


def _find_adapter_for(request: Request, principal: Principal, name: str) -> AdapterRef | None:
    with app_state(request).db_engine.connect() as conn:
        return find_adapter(conn, _tenant_id(principal), name)


def _look_up_served_adapter(
    request: Request, key_hash: str, name: str, cache: LookupCache | None
) -> AdapterRef | None:
    generation = cache.generation if cache is not None else 0
    with app_state(request).db_engine.connect() as conn:
        key, ref = find_key_and_adapter(conn, key_hash, name)
    _principal_of(key)  # 401 for an unknown or revoked key
    if key is None or not key.tenant_exists:  # key outlived its tenant
        raise _invalid_key()
    if cache is not None and ref is not None and not ref.checkpoint:
        cache.put(key_hash, name, ref, key.id, generation)
    return ref


ServedAdapter = Annotated[AdapterRef | None, Depends(get_served_adapter)]
