"""generations, and the generated text on items

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op
from app.db.tables import UTCDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LIVE_KEY = sa.text("idempotency_key IS NOT NULL AND status IN ('streaming', 'completed')")
STREAMING = sa.text("status = 'streaming'")


def upgrade() -> None:
    # Nullable columns without defaults: a metadata-only change on PostgreSQL, no rewrite.
    with op.batch_alter_table("items") as batch:
        batch.add_column(sa.Column("generated_text", sa.Text(), nullable=True))
        batch.add_column(sa.Column("generation_id", sa.Uuid(), nullable=True))

    op.create_table(
        "generations",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("item_id", sa.Uuid(), nullable=True),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("finish_reason", sa.String(32), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), server_default="0", nullable=False),
        sa.Column("time_to_first_token_seconds", sa.Float(), nullable=True),
        sa.Column("duration_seconds", sa.Float(), nullable=True),
        sa.Column("output", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.CheckConstraint(
            "status IN ('streaming', 'completed', 'cancelled', 'failed')",
            name=op.f("ck_generations_status_known"),
        ),
        sa.ForeignKeyConstraint(
            ["item_id"],
            ["items.id"],
            name=op.f("fk_generations_item_id_items"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_generations")),
    )
    op.create_index(
        "uq_generations_item_key",
        "generations",
        ["item_id", "idempotency_key"],
        unique=True,
        postgresql_where=LIVE_KEY,
        sqlite_where=LIVE_KEY,
    )
    op.create_index(
        "ix_generations_streaming_created_at",
        "generations",
        ["created_at"],
        postgresql_where=STREAMING,
        sqlite_where=STREAMING,
    )
    op.create_index("ix_generations_item_id", "generations", ["item_id"])


def downgrade() -> None:
    op.drop_table("generations")
    with op.batch_alter_table("items") as batch:
        batch.drop_column("generation_id")
        batch.drop_column("generated_text")
