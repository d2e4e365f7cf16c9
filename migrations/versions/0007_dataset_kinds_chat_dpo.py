"""Dataset kinds chat and dpo: OpenAI's fine-tuning rows for a decoder base.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06

``datasets.kind`` may also be ``chat`` (OpenAI chat rows, ``{"messages": [...]}``) and ``dpo``
(OpenAI DPO rows); the check constraint is widened. Downgrading refuses while such datasets
exist (the narrower constraint cannot hold them).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NAME = "ck_datasets_kind"
_BEFORE = "kind IN ('classification', 'preference')"
_AFTER = "kind IN ('classification', 'preference', 'chat', 'dpo')"


def _replace(condition: str) -> None:
    # Batch mode: SQLite cannot alter a constraint, so the table is copied with the new one;
    # PostgreSQL gets a plain DROP / ADD CONSTRAINT.
    with op.batch_alter_table("datasets") as batch:
        batch.drop_constraint(op.f(_NAME), type_="check")
        batch.create_check_constraint(op.f(_NAME), condition)


def upgrade() -> None:
    _replace(_AFTER)


def downgrade() -> None:
    _replace(_BEFORE)
