"""Importing an uploaded adapter archive: the workflow behind ``POST /v1/adapters/import``.

Three steps, each blocking (call them from a thread): :func:`precheck` refuses a taken name
or a full quota before the expensive part; :func:`load` builds the adapter from the
archive's files (``read_archive``) on the base (torch-bound); :func:`insert` stores it,
checking name and quota again inside the inserting transaction because other requests may
have raced it meanwhile.
Refusals are :class:`service.errors.ServiceError` (archive and transfer errors included).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from service.adapters.archive import ArchiveLimits
from service.adapters.quota import check_adapter_bytes_quota, check_adapter_quota, name_taken
from service.adapters.records import next_adapter_version
from service.adapters.store import adapter_row_from
from service.adapters.transfer import HeadSpec, import_files
from service.config import Settings
from service.db.models import AdapterRow
from service.db.session import committed_or_conflict
from service.errors import conflict
from service.jobs.queue import job_count
from service.tenants.lock import lock_tenant

if TYPE_CHECKING:
    from core.base import FrozenBase
    from core.decoder.base import DecoderBase


def archive_limits(settings: Settings) -> ArchiveLimits:
    # Unpacked, an adapter is at most a little more than it is packed (weights barely
    # compress); twice the import limit leaves room for that and for JSON.
    cap = 2 * settings.max_import_bytes
    return ArchiveLimits(max_member_bytes=cap, max_total_bytes=cap)


def _check_room(
    session: Session, tenant_id: str, name: str, settings: Settings, incoming: int
) -> None:
    reason = name_taken(session, tenant_id, name)
    if reason:
        raise conflict(reason, "name", "adapter_name_taken")
    check_adapter_quota(
        session, tenant_id, settings.max_adapters_per_tenant, job_count(session, tenant_id)
    )
    check_adapter_bytes_quota(session, tenant_id, settings.max_adapter_bytes_per_tenant, incoming)


def precheck(factory: sessionmaker[Session], tenant_id: str, name: str, settings: Settings) -> None:
    """Fail fast on name and quota, before unzipping and building on the base.

    The weights' size is not known yet: :func:`insert` checks the byte quota with it.
    """
    with factory() as session:
        _check_room(session, tenant_id, name, settings, incoming=0)


def load(
    files: dict[str, bytes], name: str, base: FrozenBase | DecoderBase, head: HeadSpec | None
) -> AdapterRow:
    """Import and serialise an archive's files (``read_archive``): a new, unsaved row called
    ``name``."""
    adapter = import_files(files, base, head)
    return adapter_row_from(adapter, base, name=name)


def insert(
    factory: sessionmaker[Session], tenant_id: str, row: AdapterRow, settings: Settings
) -> AdapterRow:
    """Store ``row`` as the tenant's newest adapter version; returned detached, refreshed."""
    taken = conflict(f"An adapter named '{row.name}' already exists.", "name", "adapter_name_taken")
    with factory() as session:
        with committed_or_conflict(session, taken):
            lock_tenant(session, tenant_id)
            _check_room(session, tenant_id, row.name, settings, incoming=row.size_bytes)
            row.tenant_id = tenant_id
            row.version = next_adapter_version(session, tenant_id)
            session.add(row)
        session.refresh(row)
        session.expunge(row)
    return row
