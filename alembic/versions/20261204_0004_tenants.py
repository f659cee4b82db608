"""a tenant on items, generations and idempotency keys

Expand only, so the release before it keeps serving while this runs and beside the new pods:
- `tenant` columns with a constant default (metadata-only on PostgreSQL >= 11: no rewrite),
  so the previous release's inserts land in the default tenant; each ALTER alone in its
  transaction with a short lock timeout, retried (app.db.migrations.online_ddl);
- idempotency keys keep their primary key and its type (the previous release's
  `ON CONFLICT (key)` still finds it, and none of its statements changes its result type,
  which would fail its prepared statements inside transactions); a tenant's keys are stored
  qualified (app.db.items.tenant_key);
- per-tenant list indexes built CONCURRENTLY (writes go on while they build); the previous
  release's indexes stay until a later release drops them (contract).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op
from app.db.migrations import online_ddl
from app.db.tables import SORT_COLUMNS
from app.domain.principal import DEFAULT_TENANT

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LIVE = sa.text("deleted_at IS NULL")
# In the order the app's transactions lock them (items last), though each ALTER is alone.
TABLES = ("idempotency_keys", "generations", "items")


def _index(column: str) -> str:
    return f"ix_items_tenant_live_{column}"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        for table in TABLES:
            with op.batch_alter_table(table) as batch:
                batch.add_column(
                    sa.Column(
                        "tenant", sa.String(255), nullable=False, server_default=DEFAULT_TENANT
                    )
                )
        for column in SORT_COLUMNS:
            op.create_index(_index(column), "items", ["tenant", column, "id"], sqlite_where=LIVE)
        return
    online_ddl(
        *(
            f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS tenant VARCHAR(255) NOT NULL "
            f"DEFAULT '{DEFAULT_TENANT}'"
            for table in TABLES
        ),
        # A concurrent build that failed before leaves an invalid index behind: drop it first.
        *(
            statement
            for column in SORT_COLUMNS
            for statement in (
                f"DROP INDEX CONCURRENTLY IF EXISTS {_index(column)}",
                f"CREATE INDEX CONCURRENTLY {_index(column)} ON items (tenant, {column}, id) "
                "WHERE deleted_at IS NULL",
            )
        ),
    )


def downgrade() -> None:
    for column in SORT_COLUMNS:
        op.drop_index(_index(column), "items")
    for table in reversed(TABLES):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("tenant")
