"""a heartbeat on streaming generations

The worker running a stream refreshes `heartbeat_at` with its checkpoints (and every few
seconds while it waits for tokens), so a stream whose worker died is found within seconds
instead of STREAM_MAX_SECONDS + 60 s after it started.

Expand only: a nullable column without default (metadata-only on PostgreSQL), alone in its
transaction with a short lock timeout, retried (app.db.migrations.online_ddl). The previous
release leaves it NULL, and such rows are swept by their start time as before.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op
from app.db.migrations import online_ddl
from app.db.tables import UTCDateTime

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        with op.batch_alter_table("generations") as batch:
            batch.add_column(sa.Column("heartbeat_at", UTCDateTime(), nullable=True))
        return
    online_ddl(
        "ALTER TABLE generations ADD COLUMN IF NOT EXISTS heartbeat_at TIMESTAMP WITH TIME ZONE"
    )


def downgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.drop_column("heartbeat_at")
