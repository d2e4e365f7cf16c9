"""First start: an empty database gets a ``default`` tenant and a key written to a file."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.config import DEFAULT_TENANT_NAME
from service.db.models import Tenant
from service.tenants.keys import create_api_key, create_tenant, tenant_by_name

logger = logging.getLogger(__name__)


def write_secret_file(path: Path, secret: str) -> None:
    """Write ``secret`` readable by the owner only (0600), replacing any old file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(secret + "\n")
        os.chmod(tmp, 0o600)  # the umask cannot widen it, but an existing tmp file could
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def bootstrap_default_tenant(factory: sessionmaker[Session], key_path: Path) -> Path | None:
    """Create the default tenant and its key when the database has no tenant at all.

    Returns the key file's path when a key was created. Safe against two processes starting
    at once: the unique tenant name makes the loser roll back and do nothing.
    """
    with factory() as session:
        if session.scalar(select(func.count()).select_from(Tenant)):
            return None
        try:
            tenant = create_tenant(session, DEFAULT_TENANT_NAME)
            new_key = create_api_key(session, tenant, name="bootstrap")
            # The file is written before the commit: a key that is committed but lost would
            # lock the operator out, a file whose key never committed is merely stale.
            write_secret_file(key_path, new_key.secret)
            session.commit()
        except IntegrityError:
            session.rollback()
            return None
    logger.warning("created tenant %r; its API key is in %s", DEFAULT_TENANT_NAME, key_path)
    return key_path


def ensure_default_tenant(factory: sessionmaker[Session]) -> str:
    """The default tenant's id, creating it (without a key) if needed: for auth_disabled."""
    with factory() as session:
        tenant = tenant_by_name(session, DEFAULT_TENANT_NAME)
        if tenant is not None:
            return tenant.id
        try:
            tenant = create_tenant(session, DEFAULT_TENANT_NAME)
            session.commit()
            return tenant.id
        except IntegrityError:
            session.rollback()
            tenant = tenant_by_name(session, DEFAULT_TENANT_NAME)
            assert tenant is not None
            return tenant.id
