"""Pydantic models at the HTTP boundary only."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Self
from uuid import UUID

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictBool,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from app.domain.models import Generation, Item, ItemFields, ItemPage

# PostgreSQL text cannot hold U+0000 (SQLite can): refused on every backend alike, at the
# boundary, as a pattern every string input declares, so the OpenAPI document says so too and
# the answer is a 422 naming the field rather than a 500 from the driver.
NO_NUL = r"^[^\x00]*$"
NUL_MESSAGE = "must not contain the NUL character (\\u0000)"
# JSON can spell a lone UTF-16 surrogate (`"\\ud800"`), which no UTF-8 text (the database, an
# upstream request, a log line) can hold.
UNICODE_MESSAGE = "must be valid Unicode text (an unpaired surrogate escape such as \\ud800 is not)"


def storable(value: str) -> str:
    """Text the service may store or pass on: no NUL, valid Unicode."""
    if "\x00" in value:
        raise ValueError(NUL_MESSAGE)
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError(UNICODE_MESSAGE) from None
    return value


Text = Annotated[str, StringConstraints(pattern=NO_NUL)]
"""A string the service may store or pass on: every such input is declared with it."""

# The documented examples (the docs page, generated clients and the fuzzer's example phase use
# them; tests/test_openapi_contract.py validates each against its schema).
ITEM_IN_EXAMPLE: dict[str, Any] = {
    "name": "Espresso cup",
    "description": "Porcelain, 90 ml",
    "price": 12.5,
    "is_active": True,
}
ITEM_EXAMPLE: dict[str, Any] = {
    "id": "01a22d06-d5f4-7515-bb0a-3196063f3662",
    **ITEM_IN_EXAMPLE,
    "version": 1,
    "created_at": "2026-11-30T15:15:52.436942Z",
    "updated_at": "2026-11-30T15:15:52.436942Z",
    "deleted_at": None,
    "generated_text": None,
    "generation_id": None,
    "created_by": "user-42",
    "tenant": "acme",
}

Name = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200, pattern=NO_NUL)
]
Description = Annotated[str, StringConstraints(max_length=10_000, pattern=NO_NUL)]
# A non-negative amount with at most two decimals (numeric(12,2)). Declared as the JSON number
# it is (Pydantic would also advertise strings, which clients should not send).
MONEY_SCHEMA = {"type": "number", "minimum": 0, "maximum": 9_999_999_999.99, "multipleOf": 0.01}
Money = Annotated[
    Decimal,
    Field(ge=0, max_digits=12, decimal_places=2),
    WithJsonSchema(MONEY_SCHEMA, mode="validation"),
]
Price = Annotated[
    Money,
    Field(examples=[19.99]),
    # JSON clients expect a number; 12 significant digits survive a double exactly.
    PlainSerializer(float, return_type=float, when_used="json"),
]


class ItemIn(BaseModel):
    """A complete item: the body of POST (create) and PUT (full replace). On PUT, an omitted
    optional field is reset to its default."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [ITEM_IN_EXAMPLE]})

    name: Name
    description: Description | None = None
    price: Price
    is_active: StrictBool = True  # JSON true/false only, not 1 or "yes"

    def to_fields(self) -> ItemFields:
        return ItemFields(
            name=self.name,
            description=self.description,
            price=self.price,
            is_active=self.is_active,
        )


class ItemPatch(BaseModel):
    """JSON Merge Patch (RFC 7396): only the fields present change; `description: null`
    clears the description. Required fields cannot be set to null."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"price": 9.9, "description": None}]}
    )

    # Required fields may be left out but not set to null: the schema does not offer null.
    name: Name | SkipJsonSchema[None] = None
    description: Description | None = None
    price: Price | SkipJsonSchema[None] = None
    is_active: StrictBool | SkipJsonSchema[None] = None

    @model_validator(mode="after")
    def _no_null_for_required(self) -> Self:
        for name in ("name", "price", "is_active"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self

    def changes(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.model_fields_set}


class ItemOut(BaseModel):
    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [ITEM_EXAMPLE]})

    id: UUID
    name: str
    description: str | None
    price: Price
    is_active: bool
    version: int = Field(description="row version; the ETag carries it")
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None = Field(description="set when soft-deleted")
    generated_text: str | None = Field(
        None, description="text of the last completed `POST /v1/items/{id}/generate`"
    )
    generation_id: UUID | None = Field(None, description="the generation that wrote it")
    created_by: str | None = Field(None, description="subject of the token that created it")
    tenant: str = Field(description="the tenant it belongs to (AUTH_TENANT_CLAIM)")

    @classmethod
    def of(cls, item: Item) -> ItemOut:
        return cls.model_validate(item)


class ItemPageOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "data": [ITEM_EXAMPLE],
                    "per_page": 20,
                    "page": None,
                    "total": None,
                    "next_cursor": "eyJrIjpbIjIwMjYtMTEtMzBUMTU6MTU6NTIuNDM2OTQyWiJdfQ",
                }
            ]
        }
    )

    data: list[ItemOut]
    per_page: int
    page: int | None = Field(description="offset page number; null for cursor pages")
    total: int | None = Field(description="matching items, with include_total=true")
    next_cursor: str | None = Field(description="pass as `cursor` for the next page")

    @classmethod
    def of(cls, page: ItemPage) -> ItemPageOut:
        return cls(
            data=[ItemOut.of(item) for item in page.items],
            per_page=page.per_page,
            page=page.page,
            total=page.total,
            next_cursor=page.next_cursor,
        )


class Problem(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "about:blank",
                    "title": "Unprocessable Entity",
                    "status": 422,
                    "detail": "price: Input should be greater than or equal to 0",
                    "instance": "/v1/items",
                    "errors": [
                        {
                            "location": "body",
                            "field": "price",
                            "message": "Input should be greater than or equal to 0",
                            "type": "greater_than_equal",
                        }
                    ],
                }
            ]
        }
    )

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None


class Status(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok", "detail": None}]})

    status: str
    detail: str | None = None


class Liveness(Status):
    """What /livez says: alive, and which build is running (a rollout shows on a dashboard
    and in a probe's answer alike)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"status": "ok", "version": "0.1.0", "revision": "1bd9bcd"}]
        }
    )

    version: str
    revision: str


# --- generations ---------------------------------------------------------------------------


class GenerateIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"instructions": "A two-line product blurb", "max_tokens": 64}]
        },
    )

    instructions: Text | None = Field(
        None, min_length=1, max_length=4000, description="what to write; a description by default"
    )
    max_tokens: int | None = Field(None, ge=1)


class GenerationOut(BaseModel):
    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [
                {
                    "id": "01a22d07-0c1e-7d2a-9b3f-5c6d7e8f9a0b",
                    "kind": "item",
                    "item_id": "01a22d06-d5f4-7515-bb0a-3196063f3662",
                    "provider": "mock",
                    "model": "itemstream-mock",
                    "status": "completed",
                    "error": None,
                    "finish_reason": "stop",
                    "prompt_tokens": 12,
                    "completion_tokens": 9,
                    "time_to_first_token_seconds": 0.012,
                    "duration_seconds": 0.2,
                    "output": "A sturdy porcelain cup for a perfect espresso.",
                    "created_at": "2026-11-30T15:16:00.120000Z",
                    "finished_at": "2026-11-30T15:16:00.320000Z",
                    "principal": "user-42",
                    "tenant": "acme",
                }
            ]
        },
    )

    id: UUID
    kind: str = Field(description="chat or item")
    item_id: UUID | None
    provider: str
    model: str
    status: str = Field(description="streaming, completed, cancelled or failed")
    error: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int
    time_to_first_token_seconds: float | None
    duration_seconds: float | None
    output: str | None
    created_at: datetime
    finished_at: datetime | None
    principal: str | None = Field(None, description="subject of the caller's token")
    tenant: str = Field(description="the tenant it belongs to (AUTH_TENANT_CLAIM)")

    @classmethod
    def of(cls, generation: Generation) -> GenerationOut:
        return cls.model_validate(generation)
