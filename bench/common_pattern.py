"""The common pattern, as the popular tutorials write it: FastAPI, the async ORM, a session per
request from a dependency that commits on the way out, add/commit/refresh, response_model.

Run: gunicorn -k uvicorn_worker.UvicornWorker 'bench.common_pattern:app' (COMMON_URL set)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict
from sqlalchemy import Boolean, DateTime, Integer, Numeric, String, Text, Uuid, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

engine = create_async_engine(
    os.environ.get("COMMON_URL", "sqlite+aiosqlite://"), pool_size=10, max_overflow=5
)
SessionLocal = async_sessionmaker(engine, expire_on_commit=False)


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    price: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=lambda: datetime.now(UTC)
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=lambda: datetime.now(UTC)
    )
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ItemCreate(BaseModel):
    name: str
    description: str | None = None
    price: Decimal
    is_active: bool = True


class ItemUpdate(BaseModel):
    name: str | None = None
    description: str | None = None
    price: Decimal | None = None
    is_active: bool | None = None


class ItemRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: uuid.UUID
    name: str
    description: str | None
    price: Decimal
    is_active: bool
    version: int
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


class ItemList(BaseModel):
    data: list[ItemRead]
    per_page: int


async def get_db() -> AsyncIterator[AsyncSession]:
    async with SessionLocal() as session:
        yield session
        await session.commit()


Db = Annotated[AsyncSession, Depends(get_db)]
app = FastAPI()


@app.get("/readyz")
async def readyz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/v1/items", response_model=ItemList)
async def list_items(
    db: Db,
    per_page: int = 20,
    is_active: bool | None = None,
    min_price: Decimal | None = None,
    max_price: Decimal | None = None,
    q: str | None = None,
) -> ItemList:
    query = select(Item).where(Item.deleted_at.is_(None))
    if is_active is not None:
        query = query.where(Item.is_active == is_active)
    if min_price is not None:
        query = query.where(Item.price >= min_price)
    if max_price is not None:
        query = query.where(Item.price <= max_price)
    if q:
        query = query.where(Item.name.ilike(f"%{q}%") | Item.description.ilike(f"%{q}%"))
    rows = (await db.scalars(query.order_by(Item.created_at.desc()).limit(per_page))).all()
    return ItemList(data=[ItemRead.model_validate(row) for row in rows], per_page=per_page)


@app.post("/v1/items", response_model=ItemRead, status_code=201)
async def create_item(body: ItemCreate, db: Db) -> Item:
    item = Item(**body.model_dump())
    db.add(item)
    await db.commit()
    await db.refresh(item)
    return item


@app.get("/v1/items/{item_id}", response_model=ItemRead)
async def get_item(item_id: uuid.UUID, db: Db) -> Item:
    item = await db.get(Item, item_id)
    if item is None or item.deleted_at is not None:
        raise HTTPException(404, "not found")
    return item


@app.patch("/v1/items/{item_id}", response_model=ItemRead)
async def patch_item(item_id: uuid.UUID, body: ItemUpdate, db: Db) -> Item:
    item = await db.get(Item, item_id)
    if item is None:
        raise HTTPException(404, "not found")
    for key, value in body.model_dump(exclude_unset=True).items():
        setattr(item, key, value)
    item.version += 1
    item.updated_at = datetime.now(UTC)
    await db.commit()
    await db.refresh(item)
    return item
