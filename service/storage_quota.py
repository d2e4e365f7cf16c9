"""Per-tenant byte quotas: what a tenant's stored datasets and adapters may add up to.

Counts stop one tenant from filling the shared database (a ``full`` adapter is ~86 MB, an
upload up to ``max_upload_bytes``), so both the dataset routes and the adapter paths (job
creation, import) check bytes here, with one ``SUM`` over the size each row records.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from service.errors import quota_exceeded

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(size: int) -> str:
    """``1.2 GiB``, ``1 GiB``, ``512 B``: binary units, one decimal where it says something."""
    value, unit = float(size), 0
    while value >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    if unit == 0:
        return f"{size} B"
    return f"{value:.1f}".removesuffix(".0") + f" {_UNITS[unit]}"


def check_bytes_quota(
    session: Session,
    size: InstrumentedAttribute[int],
    tenant_id: str,
    *,
    incoming: int,
    limit: int,
    what: str,
    code: str,
) -> None:
    """A quota error (429) unless ``incoming`` more bytes fit beside the tenant's ``size`` sum.

    ``size`` is the column that records each row's bytes (its table has ``tenant_id``);
    ``what`` names the rows in the message (``datasets``). ``incoming`` is 0 where the size
    is not known yet (the adapter a new job will train): that is refused once the usage has
    reached the limit, so a finished job never loses its adapter to the quota.
    """
    table = size.class_
    used = int(
        session.scalar(select(func.coalesce(func.sum(size), 0)).where(table.tenant_id == tenant_id))
        or 0
    )
    if used < limit and used + incoming <= limit:
        return
    adds = f"; this one adds {format_bytes(incoming)}" if incoming else ""
    raise quota_exceeded(
        f"This tenant's {what} use {format_bytes(used)} of {format_bytes(limit)}{adds}. "
        f"Delete some {what} first.",
        code,
    )
