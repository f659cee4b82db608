from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import create_async_engine

from app.config import Settings
from app.db.engine import Database, create_engine
from app.db.tables import idempotency_keys
from app.domain.models import ItemFields
from app.domain.principal import ALL_SCOPES, Principal
from app.services.items import ItemPolicy, ItemService

CALLER = Principal("test", ALL_SCOPES)


async def test_expired_keys_are_purged_and_live_ones_kept(settings: Settings) -> None:
    db = Database(create_engine(settings.db))
    direct = create_async_engine(settings.db.app_url)
    service = ItemService(db, ItemPolicy(idempotency_ttl=timedelta(hours=1)))
    fields = ItemFields(name="x", description=None, price=Decimal(1), is_active=True)
    try:
        await service.create(CALLER, fields, "old")
        await service.create(CALLER, fields, "fresh")
        async with direct.begin() as conn:
            await conn.execute(
                update(idempotency_keys)
                .where(idempotency_keys.c.key == "old")
                .values(created_at=datetime.now(UTC) - timedelta(hours=2))
            )
        assert await service.purge_expired_idempotency_keys() == 1
        async with direct.begin() as conn:
            keys = set((await conn.execute(select(idempotency_keys.c.key))).scalars())
        assert keys == {"fresh"}
        # An expired key may be used again for a new request.
        again = await service.create(CALLER, ItemFields("y", None, Decimal(2), True), "old")
        assert not again.replayed
    finally:
        await db.dispose()
        await direct.dispose()


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_expired_key_is_taken_over_without_purge(settings: Settings) -> None:
    db = Database(create_engine(settings.db))
    direct = create_async_engine(settings.db.app_url)
    service = ItemService(db, ItemPolicy(idempotency_ttl=timedelta(hours=1)))
    try:
        first = await service.create(CALLER, ItemFields("a", None, Decimal(1), True), "k")
        async with direct.begin() as conn:
            await conn.execute(
                update(idempotency_keys).values(created_at=datetime.now(UTC) - timedelta(hours=2))
            )
        second = await service.create(CALLER, ItemFields("b", None, Decimal(2), True), "k")
        assert not second.replayed
        assert second.item.id != first.item.id
    finally:
        await db.dispose()
        await direct.dispose()
