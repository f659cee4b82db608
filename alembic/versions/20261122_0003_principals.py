"""who created items and generations

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: metadata-only on PostgreSQL; rows from before stay NULL.
    with op.batch_alter_table("items") as batch:
        batch.add_column(sa.Column("created_by", sa.String(255), nullable=True))
    with op.batch_alter_table("generations") as batch:
        batch.add_column(sa.Column("principal", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.drop_column("principal")
    with op.batch_alter_table("items") as batch:
        batch.drop_column("created_by")
