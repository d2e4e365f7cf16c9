"""API keys: ``lpx_`` + random secret, stored only as a sha256 hash plus a short prefix."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import ApiKey, Tenant
from service.db.session import committed_or_conflict
from service.db.types import utcnow
from service.errors import conflict

KEY_PREFIX = "lpx_"
VISIBLE_PREFIX_CHARS = 8  # "lpx_" + 4 characters of the secret


def hash_api_key(secret: str) -> str:
    # A plain sha256 is enough: keys are 256-bit random, so there is nothing to brute-force
    # and a slow password hash would only cost latency on every request.
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def generate_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class NewKey:
    row: ApiKey
    secret: str  # shown once, at creation


def create_api_key(
    session: Session, tenant: Tenant, *, is_admin: bool = False, name: str | None = None
) -> NewKey:
    """Add a key for ``tenant`` to the session (the caller commits)."""
    secret = generate_api_key()
    row = ApiKey(
        tenant_id=tenant.id,
        name=name,
        prefix=secret[:VISIBLE_PREFIX_CHARS],
        key_hash=hash_api_key(secret),
        is_admin=is_admin,
    )
    session.add(row)
    session.flush()
    return NewKey(row=row, secret=secret)


def create_tenant(session: Session, name: str) -> Tenant:
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    return tenant


def create_tenant_with_key(session: Session, name: str, key_name: str) -> tuple[Tenant, NewKey]:
    """A new tenant called ``name`` and its first key, committed; a conflict if it is taken."""
    taken = conflict(f"A tenant named '{name}' already exists.", "name", "tenant_exists")
    with committed_or_conflict(session, taken):
        tenant = create_tenant(session, name)
        new_key = create_api_key(session, tenant, name=key_name)
    return tenant, new_key


def tenant_by_name(session: Session, name: str) -> Tenant | None:
    return session.scalar(select(Tenant).where(Tenant.name == name))


def key_by_secret(session: Session, secret: str) -> ApiKey | None:
    """The key row for a presented secret, revoked or not (the caller decides)."""
    return session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_api_key(secret)))


def revoke_key(key: ApiKey) -> None:
    if key.revoked_at is None:
        key.revoked_at = utcnow()
