"""All SQL for items and idempotency keys. Every method runs on the caller's connection, inside
the caller's transaction; one statement per round trip."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import Select, and_, delete, func, insert, literal, or_, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from app.db.tables import idempotency_keys, items
from app.services.models import Item, ItemFilter, Position, Sort

_ITEM_COLUMNS = (
    items.c.id,
    items.c.name,
    items.c.description,
    items.c.price,
    items.c.is_active,
    items.c.version,
    items.c.created_at,
    items.c.updated_at,
    items.c.deleted_at,
)
_SORT_COLUMNS = {"created_at": items.c.created_at, "name": items.c.name, "price": items.c.price}


def _item(row: Any) -> Item:
    return Item(*row)


def escape_like(text: str) -> str:
    """Make user text match literally inside a LIKE pattern (escape character: backslash)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@dataclass(frozen=True, slots=True)
class StoredKey:
    request_hash: str
    status_code: int | None
    response_body: str | None
    resource_id: UUID | None


class ItemRepository:
    def __init__(self, connection: AsyncConnection) -> None:
        self._conn = connection
        self._dialect = connection.dialect.name

    # --- items -------------------------------------------------------------------------

    async def insert(self, values: Mapping[str, Any]) -> Item:
        result = await self._conn.execute(insert(items).values(**values).returning(*_ITEM_COLUMNS))
        return _item(result.one())

    async def get(self, item_id: UUID, *, include_deleted: bool = False) -> Item | None:
        query = select(*_ITEM_COLUMNS).where(items.c.id == item_id)
        if not include_deleted:
            query = query.where(items.c.deleted_at.is_(None))
        row = (await self._conn.execute(query)).first()
        return None if row is None else _item(row)

    async def update(
        self,
        item_id: UUID,
        values: Mapping[str, Any],
        *,
        expected_versions: Collection[int] | None,
        deleted: bool = False,
    ) -> Item | None:
        """Conditional update; returns None when the row is missing, in the wrong deleted state,
        or at another version. The version bump makes concurrent writers serialize on the row."""
        state = items.c.deleted_at.is_not(None) if deleted else items.c.deleted_at.is_(None)
        query = (
            update(items)
            .where(items.c.id == item_id, state)
            .values(**values, version=items.c.version + 1)
            .returning(*_ITEM_COLUMNS)
        )
        if expected_versions is not None:
            query = query.where(items.c.version.in_(expected_versions))
        row = (await self._conn.execute(query)).first()
        return None if row is None else _item(row)

    async def delete(self, item_id: UUID, *, expected_versions: Collection[int] | None) -> bool:
        query = delete(items).where(items.c.id == item_id).returning(items.c.id)
        if expected_versions is not None:
            query = query.where(items.c.version.in_(expected_versions))
        return (await self._conn.execute(query)).first() is not None

    async def page(
        self,
        filters: ItemFilter,
        sort: Sort,
        *,
        limit: int,
        offset: int = 0,
        after: Position | None = None,
    ) -> list[Item]:
        column = _SORT_COLUMNS[sort.field]
        query = self._filtered(select(*_ITEM_COLUMNS), filters)
        if after is not None:
            key = tuple_(column, items.c.id)
            start = tuple_(_literal_like(column, after.value), _literal_like(items.c.id, after.id))
            query = query.where(key < start if sort.descending else key > start)
        order = (column.desc(), items.c.id.desc()) if sort.descending else (column, items.c.id)
        query = query.order_by(*order).limit(limit).offset(offset)
        return [_item(row) for row in await self._conn.execute(query)]

    async def count(self, filters: ItemFilter) -> int:
        query = self._filtered(select(func.count()).select_from(items), filters)
        return int((await self._conn.execute(query)).scalar_one())

    def _filtered(self, query: Select[Any], filters: ItemFilter) -> Select[Any]:
        conditions: list[ColumnElement[bool]] = []
        if not filters.include_deleted:
            conditions.append(items.c.deleted_at.is_(None))
        if filters.is_active is not None:
            conditions.append(items.c.is_active.is_(filters.is_active))
        if filters.min_price is not None:
            conditions.append(items.c.price >= filters.min_price)
        if filters.max_price is not None:
            conditions.append(items.c.price <= filters.max_price)
        if filters.q:
            pattern = f"%{escape_like(filters.q)}%"
            # Two predicates, each backed by its own pg_trgm GIN index (BitmapOr on Postgres).
            conditions.append(
                or_(
                    items.c.name.ilike(pattern, escape="\\"),
                    items.c.description.ilike(pattern, escape="\\"),
                )
            )
        return query.where(and_(*conditions)) if conditions else query

    # --- idempotency keys ---------------------------------------------------------------

    async def claim_key(
        self, key: str, request_hash: str, now: datetime, expired_before: datetime
    ) -> bool:
        """Insert the key, or take over an expired one. False when a live key exists; on
        Postgres this waits for a concurrent claimer of the same key to commit or roll back."""
        ins = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        stmt = ins(idempotency_keys).values(key=key, request_hash=request_hash, created_at=now)
        upsert = stmt.on_conflict_do_update(
            index_elements=[idempotency_keys.c.key],
            set_={
                "request_hash": stmt.excluded.request_hash,
                "created_at": stmt.excluded.created_at,
                "status_code": None,
                "response_body": None,
                "resource_id": None,
            },
            where=idempotency_keys.c.created_at < expired_before,
        ).returning(idempotency_keys.c.key)
        return (await self._conn.execute(upsert)).first() is not None

    async def get_key(self, key: str) -> StoredKey | None:
        query = select(
            idempotency_keys.c.request_hash,
            idempotency_keys.c.status_code,
            idempotency_keys.c.response_body,
            idempotency_keys.c.resource_id,
        ).where(idempotency_keys.c.key == key)
        row = (await self._conn.execute(query)).first()
        return None if row is None else StoredKey(*row)

    async def complete_key(self, key: str, status_code: int, body: str, resource_id: UUID) -> None:
        await self._conn.execute(
            update(idempotency_keys)
            .where(idempotency_keys.c.key == key)
            .values(status_code=status_code, response_body=body, resource_id=resource_id)
        )

    async def purge_keys(self, expired_before: datetime) -> int:
        result = await self._conn.execute(
            delete(idempotency_keys).where(idempotency_keys.c.created_at < expired_before)
        )
        return int(result.rowcount or 0)


def _literal_like(column: Any, value: object) -> Any:
    return literal(value, type_=column.type)
