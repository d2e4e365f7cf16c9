"""Cursor pagination, newest first: ``?after=<id>&limit=N`` → ``{data, has_more}``.

Keyset on ``(created_at, id)`` rather than OFFSET: pages stay correct while rows are being
added, and every page costs one index range scan.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import Query
from sqlalchemy import ColumnElement, and_, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from service.errors import invalid
from service.names import NoControlCharacters

DEFAULT_LIMIT = 20
MAX_LIMIT = 100

LimitQuery = Annotated[
    int,
    Query(
        ge=1,
        le=MAX_LIMIT,
        description=f"How many items a page holds: 1 to {MAX_LIMIT}, default {DEFAULT_LIMIT}.",
    ),
]
AfterQuery = Annotated[
    str | None,
    Query(
        max_length=128,
        description="Cursor: the `last_id` of the previous page; leave it out for the first.",
    ),
    NoControlCharacters,  # no id or name has one (service.names)
]


class _Paged(Protocol):
    id: Any
    created_at: Any


M = TypeVar("M", bound=_Paged)


def keyset_page(
    session: Session,
    model: type[M],
    where: Sequence[ColumnElement[bool]],
    *,
    after: str | None,
    limit: int,
    cursor_column: InstrumentedAttribute[Any] | None = None,
    descending: bool = True,
) -> tuple[list[M], bool]:
    """One page of ``model`` rows matching ``where``, newest first, and whether more follow.

    ``descending=False`` pages oldest first (OpenAI's ``order=asc``).

    ``after`` is matched against ``cursor_column`` (the id unless told otherwise, e.g. the
    adapter name), *within* ``where``: another tenant's id is an unknown cursor.
    """
    created: Any = model.created_at
    ident: Any = model.id
    stmt = select(model).where(*where)
    if after is not None:
        key = cursor_column if cursor_column is not None else ident
        cursor = session.execute(select(created, ident).where(*where, key == after)).one_or_none()
        if cursor is None:
            raise invalid(f"Unknown cursor '{after}'.", "after", "invalid_cursor")
        c_created, c_id = cursor
        if descending:
            stmt = stmt.where(or_(created < c_created, and_(created == c_created, ident < c_id)))
        else:
            stmt = stmt.where(or_(created > c_created, and_(created == c_created, ident > c_id)))
    order = (created.desc(), ident.desc()) if descending else (created.asc(), ident.asc())
    rows = list(session.scalars(stmt.order_by(*order).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
