"""Table definitions (SQLAlchemy Core). Alembic migrations are the source of truth for DDL;
these mirror them for queries and autogenerate checks."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    TypeDecorator,
    Uuid,
    text,
)

from app.domain.principal import DEFAULT_TENANT

# Stable constraint names, so migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# The orders a list may ask for (each with a partial index per tenant).
SORT_COLUMNS = ("created_at", "name", "price")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend (SQLite hands back naive datetimes)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        # SQLite stores text; a fixed naive-UTC form keeps lexical order == time order.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


items = Table(
    "items",
    metadata,
    Column("id", Uuid(), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("description", Text(), nullable=True),
    Column("price", Numeric(12, 2, asdecimal=True), nullable=False),
    Column("is_active", Boolean(), nullable=False, server_default="1"),
    Column("version", Integer(), nullable=False, server_default="1"),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("deleted_at", UTCDateTime(), nullable=True),
    # The last completed item-grounded generation (see generations).
    Column("generated_text", Text(), nullable=True),
    Column("generation_id", Uuid(), nullable=True),
    Column("created_by", String(255), nullable=True),  # the token's subject
    # Whose item it is: every query names it (app.db.items); rows from before tenancy, and
    # every row when authentication is off, belong to the default tenant.
    Column("tenant", String(255), nullable=False, server_default=DEFAULT_TENANT),
    CheckConstraint("price >= 0", name="price_non_negative"),
    CheckConstraint("version >= 1", name="version_positive"),
    # Partial: lists hide soft-deleted rows unless asked, so the hot path skips them. Led by
    # the tenant, so a tenant's keyset page is a range of one index.
    *(
        Index(
            f"ix_items_tenant_live_{column}",
            "tenant",
            column,
            "id",
            postgresql_where=text("deleted_at IS NULL"),
            sqlite_where=text("deleted_at IS NULL"),
        )
        for column in SORT_COLUMNS
    ),
    # The release before tenancy orders by these; 0004 keeps them for it (expand/contract:
    # a later release drops them).
    *(
        Index(
            f"ix_items_live_{column}",
            column,
            "id",
            postgresql_where=text("deleted_at IS NULL"),
            sqlite_where=text("deleted_at IS NULL"),
        )
        for column in SORT_COLUMNS
    ),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    # The client's key qualified by its tenant (app.db.items.tenant_key): the same key from two
    # tenants is two rows.
    Column("key", String(255), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("status_code", Integer(), nullable=True),
    Column("response_body", Text(), nullable=True),
    Column("resource_id", Uuid(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("tenant", String(255), nullable=False, server_default=DEFAULT_TENANT),
    Index("ix_idempotency_keys_created_at", "created_at"),
)

GENERATION_STATUSES = ("streaming", "completed", "cancelled", "failed")

generations = Table(
    "generations",
    metadata,
    Column("id", Uuid(), primary_key=True),
    Column("kind", String(16), nullable=False),  # chat | item
    Column("item_id", Uuid(), ForeignKey("items.id", ondelete="SET NULL"), nullable=True),
    Column("idempotency_key", String(255), nullable=True),
    Column("provider", String(32), nullable=False),
    Column("model", String(200), nullable=False),
    Column("status", String(16), nullable=False),
    Column("error", Text(), nullable=True),
    Column("finish_reason", String(32), nullable=True),
    Column("prompt_tokens", Integer(), nullable=True),
    Column("completion_tokens", Integer(), nullable=False, server_default="0"),
    Column("time_to_first_token_seconds", Float(), nullable=True),
    Column("duration_seconds", Float(), nullable=True),
    Column("output", Text(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("finished_at", UTCDateTime(), nullable=True),
    # Refreshed by the worker running the stream (0005); NULL from a release before it.
    Column("heartbeat_at", UTCDateTime(), nullable=True),
    Column("principal", String(255), nullable=True),
    Column("tenant", String(255), nullable=False, server_default=DEFAULT_TENANT),
    CheckConstraint(
        "status IN ('streaming', 'completed', 'cancelled', 'failed')", name="status_known"
    ),
    # One live or completed generation per item and key: a retried request replays it.
    Index(
        "uq_generations_item_key",
        "item_id",
        "idempotency_key",
        unique=True,
        postgresql_where=text(
            "idempotency_key IS NOT NULL AND status IN ('streaming', 'completed')"
        ),
        sqlite_where=text("idempotency_key IS NOT NULL AND status IN ('streaming', 'completed')"),
    ),
    # The sweeper looks for streams whose worker died.
    Index(
        "ix_generations_streaming_created_at",
        "created_at",
        postgresql_where=text("status = 'streaming'"),
        sqlite_where=text("status = 'streaming'"),
    ),
    Index("ix_generations_item_id", "item_id"),
)
