"""Dataset kinds chat and dpo: OpenAI's fine-tuning rows for a decoder base.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06

``datasets.kind`` may also be ``chat`` (OpenAI chat rows, ``{"messages": [...]}``) and ``dpo``
(OpenAI DPO rows); the check constraint is widened. Downgrading refuses while such datasets
exist (the narrower constraint cannot hold them).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op
from alembic.util import CommandError

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NAME = "ck_datasets_kind"
_BEFORE = "kind IN ('classification', 'preference')"
_AFTER = "kind IN ('classification', 'preference', 'chat', 'dpo')"
_NEW_KIND_DATASETS = (
    "SELECT id, tenant_id, kind FROM datasets WHERE kind IN ('chat', 'dpo') ORDER BY id"
)
_SHOWN = 10  # datasets named in the refusal; the rest are counted


def _replace(condition: str) -> None:
    # Batch mode: SQLite cannot alter a constraint, so the table is copied with the new one;
    # PostgreSQL gets a plain DROP / ADD CONSTRAINT.
    with op.batch_alter_table("datasets") as batch:
        batch.drop_constraint(op.f(_NAME), type_="check")
        batch.create_check_constraint(op.f(_NAME), condition)


def upgrade() -> None:
    _replace(_AFTER)


def _refuse_new_kinds() -> None:
    """Refuses the downgrade while chat or dpo datasets exist, naming them.

    Checked before any DDL: on SQLite the batch copy is not transactional, so a copy that fails
    on the narrower constraint would leave ``_alembic_tmp_datasets`` behind and block every
    later downgrade. A CommandError is what the alembic CLI prints as one line, no traceback.
    """
    if context.is_offline_mode():  # --sql: no database to look at
        return
    rows = op.get_bind().execute(sa.text(_NEW_KIND_DATASETS)).all()
    if rows:
        shown = ", ".join(f"{id_} ({kind}, tenant {tenant})" for id_, tenant, kind in rows[:_SHOWN])
        more = f" and {len(rows) - _SHOWN} more" if len(rows) > _SHOWN else ""
        raise CommandError(
            f"cannot downgrade below 0007: {len(rows)} dataset(s) of kind chat or dpo exist, "
            f"which revision 0006 cannot store: {shown}{more}. Delete them first "
            "(DELETE /v1/datasets/{id}); nothing was changed."
        )


def downgrade() -> None:
    _refuse_new_kinds()
    _replace(_BEFORE)
