"""The pure rules behind items: keyset cursors, idempotency snapshots and fingerprints,
entity tags and If-Match. No database, no server."""

from __future__ import annotations

from dataclasses import fields, replace
from datetime import UTC, datetime
from decimal import Decimal
from uuid import UUID

import pytest
from starlette.exceptions import HTTPException

from app.api.etags import none_match_fails, parse_if_match
from app.domain.errors import InvalidCursor, PreconditionFailed
from app.domain.models import Item, ItemFields, ItemFilter, Position, Sort
from app.services.items import (
    _check_version,
    _Cursors,
    _fingerprint,
    _from_snapshot,
    _snapshot,
)

ITEM = Item(
    id=UUID("01a22d06-d5f4-7515-bb0a-3196063f3662"),
    name="Espresso cup",
    description="Porcelain, 90 ml",
    price=Decimal("12.50"),
    is_active=True,
    version=3,
    created_at=datetime(2026, 11, 30, 15, 15, 52, 436942, tzinfo=UTC),
    updated_at=datetime(2026, 11, 30, 16, 0, tzinfo=UTC),
    deleted_at=None,
    generated_text="A sturdy cup.",
    generation_id=UUID("01a22d07-0c1e-7d2a-9b3f-5c6d7e8f9a0b"),
    created_by="user-42",
)


KEYS = (b"current-key-0123456789", b"older-key-0123456789")


def cursors(
    filters: ItemFilter, sort: Sort, reach: str | None = "acme", keys: tuple[bytes, ...] = KEYS
) -> _Cursors:
    return _Cursors(keys, filters, sort, reach)


@pytest.mark.parametrize("field", ["created_at", "name", "price"])
def test_a_cursor_resumes_after_the_last_row_of_its_sort(field: str) -> None:
    sort = Sort(field=field, descending=True)  # type: ignore[arg-type]
    filters = ItemFilter(is_active=True, q="cup")
    position = cursors(filters, sort).decode(cursors(filters, sort).encode(ITEM))
    assert position == Position(value=getattr(ITEM, field), id=ITEM.id)


def test_a_cursor_is_refused_for_another_query_tenant_or_key_and_when_forged() -> None:
    sort, filters = Sort("name"), ItemFilter()
    cursor = cursors(filters, sort).encode(ITEM)
    for other in (
        cursors(filters, Sort("price")),
        cursors(ItemFilter(q="x"), sort),
        cursors(filters, sort, reach="globex"),  # another tenant's cursor
    ):
        with pytest.raises(InvalidCursor, match="different sort or filter") as refused:
            other.decode(cursor)
        assert refused.value.field == "cursor"
    # Rotation: a cursor signed with the older key still works; one with a dropped key not.
    older = cursors(filters, sort, keys=KEYS[1:]).encode(ITEM)
    assert cursors(filters, sort).decode(older).id == ITEM.id
    with pytest.raises(InvalidCursor, match="not one this service issued"):
        cursors(filters, sort, keys=KEYS[:1]).decode(older)
    body, _, mac = cursor.partition(".")
    for forged in ("not base64 at all!", "e30", body, f"{body}.", f"e30.{mac}", cursor[:-3]):
        with pytest.raises(InvalidCursor, match="not one this service issued"):
            cursors(filters, sort).decode(forged)


def test_an_idempotency_snapshot_gives_back_every_field() -> None:
    assert _from_snapshot(_snapshot(ITEM)) == ITEM
    bare = replace(ITEM, description=None, generated_text=None, generation_id=None)
    assert _from_snapshot(_snapshot(bare)) == bare
    # Every field is in the snapshot: one added to Item is carried without another edit.
    assert set(__import__("json").loads(_snapshot(ITEM))) == {f.name for f in fields(Item)}


def test_the_request_fingerprint_sees_every_field_and_nothing_else() -> None:
    base = ItemFields(name="a", description=None, price=Decimal("1.00"), is_active=True)
    assert _fingerprint(base) == _fingerprint(replace(base))
    for change in ({"name": "b"}, {"description": ""}, {"price": Decimal("1.01")}):
        assert _fingerprint(replace(base, **change)) != _fingerprint(base)


@pytest.mark.parametrize(
    ("header", "versions"),
    [
        (None, None),
        ("*", None),
        (' "3" ', frozenset({3})),
        ('"3", "5"', frozenset({3, 5})),
        ('W/"3"', frozenset()),  # weak tags never match under If-Match
        ('"abc"', frozenset()),  # a tag that is no version of ours matches nothing
    ],
)
def test_if_match_is_parsed_as_rfc_9110_says(header: str | None, versions: object) -> None:
    assert parse_if_match(header) == versions


@pytest.mark.parametrize("header", ["3", '"3" junk', '"3",,', "W/3"])
def test_a_malformed_if_match_is_a_400(header: str) -> None:
    with pytest.raises(HTTPException) as refused:
        parse_if_match(header)
    assert refused.value.status_code == 400


def test_a_stale_version_is_refused_with_the_current_one() -> None:
    _check_version(ITEM, None)
    _check_version(ITEM, {2, 3})
    with pytest.raises(PreconditionFailed) as refused:
        _check_version(ITEM, {2})
    assert refused.value.current_version == 3


@pytest.mark.parametrize(
    ("header", "fails"),
    [("*", True), ('"3"', True), ('W/"3"', True), ('"2", "3"', True), ('"2"', False)],
)
def test_if_none_match_compares_weakly(header: str, fails: bool) -> None:
    assert none_match_fails(header, 3) is fails
