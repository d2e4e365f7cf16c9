"""One tenant's quota-checked writes, one at a time.

A quota is a count (or a byte sum) checked before an insert. Two requests of one tenant that
check at the same time both see room and both insert: 20 parallel uploads stored 7 datasets
where 5 fit, 12 parallel job creates queued 11 where 3 could wait. Taking the tenant's row
first makes check and insert one step per tenant: the next request's check waits for this
transaction to end and then counts what it stored. Other tenants are not held on PostgreSQL
(a row lock); on SQLite every write already waits for the one database write lock.
"""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from service.db.models import Tenant


def lock_tenant(session: Session, tenant_id: str) -> None:
    """Hold the tenant's row until the session's transaction ends; call it before the checks.

    A no-op UPDATE rather than ``SELECT ... FOR UPDATE``, which SQLite ignores: as the
    transaction's first write it takes SQLite's write lock (waiting for it under
    ``busy_timeout``) before the counts read anything, and PostgreSQL's row lock, after which
    READ COMMITTED statements see every transaction that held it before.
    """
    session.execute(
        update(Tenant)
        .where(Tenant.id == tenant_id)
        .values(name=Tenant.name)
        .execution_options(synchronize_session=False)
    )
