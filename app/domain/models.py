"""Domain types shared by the service and database layers (no FastAPI, no Pydantic)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Literal
from uuid import UUID

from app.domain.principal import DEFAULT_TENANT

SortField = Literal["created_at", "name", "price"]


@dataclass(frozen=True, slots=True)
class Item:
    id: UUID
    name: str
    description: str | None
    price: Decimal
    is_active: bool
    version: int
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None
    generated_text: str | None = None
    generation_id: UUID | None = None
    created_by: str | None = None
    tenant: str = DEFAULT_TENANT


@dataclass(frozen=True, slots=True)
class ItemFields:
    """A complete set of writable fields (create and full replace)."""

    name: str
    description: str | None
    price: Decimal
    is_active: bool


@dataclass(frozen=True, slots=True)
class Sort:
    field: SortField = "created_at"
    descending: bool = True


@dataclass(frozen=True, slots=True)
class ItemFilter:
    is_active: bool | None = None
    min_price: Decimal | None = None
    max_price: Decimal | None = None
    q: str | None = None
    include_deleted: bool = False

    @property
    def narrows(self) -> bool:
        """Whether it filters beyond "the tenant's items" (then a walk in sort order may have
        to read far before its page is full)."""
        return bool(
            self.q
            or self.is_active is not None
            or self.min_price is not None
            or self.max_price is not None
        )


@dataclass(frozen=True, slots=True)
class Position:
    """Where a keyset page starts: after the row with this sort value and id."""

    value: object
    id: UUID


@dataclass(frozen=True, slots=True)
class ItemPage:
    items: list[Item]
    per_page: int
    page: int | None = None
    total: int | None = None
    next_cursor: str | None = None


GenerationStatus = Literal["streaming", "completed", "cancelled", "failed"]


@dataclass(frozen=True, slots=True)
class Generation:
    id: UUID
    kind: str
    item_id: UUID | None
    idempotency_key: str | None
    provider: str
    model: str
    status: GenerationStatus
    error: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int
    time_to_first_token_seconds: float | None
    duration_seconds: float | None
    output: str | None
    created_at: datetime
    finished_at: datetime | None
    principal: str | None = None
    tenant: str = DEFAULT_TENANT
