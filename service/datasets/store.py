"""Stored datasets: one write path and one delete path for ``/v1/datasets`` and ``/v1/files``.

Both routes are faces of the same records, so they share these functions rather than copies.
Like ``service.jobs.create``, failures are raised as :class:`service.errors.ServiceError`
(not found, conflict), which the API renders as 404 and 409.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from service import ids
from service.datasets import codec
from service.datasets.validation import ParsedDataset
from service.db.models import ACTIVE_STATUSES, Dataset, Job
from service.db.session import reclaim_free_pages
from service.errors import conflict, not_found
from service.storage_quota import check_bytes_quota
from service.tenants.lock import lock_tenant


@dataclass(frozen=True)
class UploadDigest:
    """An upload as received, as a dataset records it: its size and checksum. A streamed
    upload is counted and hashed as it passes, never held whole."""

    size: int
    sha256: str

    @classmethod
    def of(cls, data: bytes) -> UploadDigest:
        return cls(size=len(data), sha256=hashlib.sha256(data).hexdigest())


def store_dataset(
    factory: sessionmaker[Session],
    tenant_id: str,
    name: str | None,
    parsed: ParsedDataset,
    received: UploadDigest,
    max_tenant_bytes: int,
) -> Dataset:
    """Insert a validated dataset, uploaded as ``received``.

    Refused (quota) where the tenant's datasets and this upload together pass
    ``max_tenant_bytes``.
    """
    dataset_id = ids.new_id(ids.DATASET)
    row = Dataset(
        id=dataset_id,
        tenant_id=tenant_id,
        name=name or dataset_id,
        kind=parsed.kind.value,
        rows=codec.encode_rows(parsed.rows),
        rows_encoding=codec.ENCODING,
        row_count=parsed.row_count,
        label_counts=parsed.label_counts,
        pair_report=parsed.pair_report,
        bytes=received.size,
        sha256=received.sha256,
    )
    # One INSERT in one transaction: a dataset is stored whole or not at all.
    with factory() as session, session.begin():
        lock_tenant(session, tenant_id)
        check_bytes_quota(
            session,
            Dataset.bytes,
            tenant_id,
            incoming=received.size,
            limit=max_tenant_bytes,
            what="datasets",
            code="dataset_bytes_limit",
        )
        session.add(row)
    return row


def get_owned_dataset(
    session: Session, tenant_id: str, dataset_id: str, kind: str = "dataset"
) -> Dataset:
    """The tenant's dataset, or not found (also another tenant's: never confirmed to exist).

    ``kind`` names the object in the 404 (``file`` on the OpenAI-shaped route).
    """
    row = session.scalar(
        select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id)
    )
    if row is None:
        raise not_found(kind, dataset_id)
    return row


def delete_owned_dataset(session: Session, row: Dataset) -> None:
    """Delete ``row`` and commit, unless a job that has not finished still reads it (conflict)."""
    # Job creation holds the tenant's lock from its quota check to its commit: without it here
    # a create that had just read the file and this check passed each other, and the job
    # queued on a deleted file (7 of 30 raced pairs, across two API processes).
    lock_tenant(session, row.tenant_id)
    in_use = session.scalar(
        select(Job.id).where(
            Job.tenant_id == row.tenant_id,
            Job.status.in_(ACTIVE_STATUSES),
            or_(Job.training_file == row.id, Job.validation_file == row.id),
        )
    )
    if in_use:
        raise conflict(
            f"Dataset '{row.id}' is used by job {in_use}, which has not finished.",
            None,
            "dataset_in_use",
        )
    session.delete(row)
    session.commit()
    reclaim_free_pages(session)
