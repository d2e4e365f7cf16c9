"""Store what training will make of a preference dataset's pairs.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05

``datasets.pair_report``: ``{"split_rows", "identical_pairs"}`` counted at upload
(service.datasets.pairs). Datasets stored before have none (null).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("pair_report", sa.JSON(none_as_null=True)))


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("pair_report")
