"""Keyset cursors (app.services.items) whatever a signed payload says: as if the signing key
had leaked, decoding gives a value its column holds, or InvalidCursor, never another error
and never a value the database would refuse."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from uuid import UUID

from hypothesis import given
from hypothesis import strategies as st

from app.domain.errors import InvalidCursor
from app.domain.models import ItemFilter, Sort
from app.services.items import _b64, _Cursors

KEYS = (b"current-key-0123456789", b"older-key-0123456789")


@given(
    value=st.one_of(
        st.text(max_size=30),
        st.integers(),
        st.floats(allow_nan=True),
        st.none(),
        st.sampled_from(
            [
                "Infinity",
                "NaN",
                "1E+999999",
                "1E-999999",
                "9999-12-31T23:59:59-14:00",
                "0001-01-01T00:00:00+14:00",
                "2026-01-01T00:00:00",
                "a\ud800",
                "12.345",
            ]
        ),
    ),
    raw_id=st.one_of(st.uuids().map(str), st.integers(), st.none(), st.text(max_size=40)),
    field=st.sampled_from(["created_at", "name", "price"]),
)
def test_a_signed_cursor_with_any_payload_decodes_to_storable_values_or_is_refused(
    value: object, raw_id: object, field: str
) -> None:
    """As if the key had leaked: whatever a signed payload says, decoding gives a value the
    column holds, or InvalidCursor (never another exception, never a value the database
    would refuse)."""
    sort, filters = Sort(field=field), ItemFilter()  # type: ignore[arg-type]
    mint = _Cursors(KEYS, filters, sort, "acme")
    payload = {"v": value, "id": raw_id, "f": mint._fingerprint}
    body = _b64(json.dumps(payload).encode())
    cursor = f"{body}.{mint._mac(KEYS[0], body)}"
    try:
        position = mint.decode(cursor)
    except InvalidCursor:
        return
    assert isinstance(position.id, UUID)
    if field == "created_at":
        assert isinstance(position.value, datetime) and position.value.tzinfo is not None
    elif field == "price":
        assert isinstance(position.value, Decimal) and position.value.is_finite()
        assert abs(position.value) < Decimal("1e10")
        assert position.value == position.value.quantize(Decimal("0.01"))
    else:
        assert isinstance(position.value, str)
        position.value.encode()  # valid Unicode
