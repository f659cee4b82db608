"""Filtered lists are read by bounded plans (app.services.items: a window of rows in sort
order first, then the filters' indexes as an expensive query): the pages are the same whatever
plan answers them, and the expensive path is bounded (its admission and its time).

The same query is asked of a service whose window is large enough to answer everything and of
one whose window is the smallest allowed, so the second goes through the indexes; both must
give the same items, in the same order, page after page (offsets and cursors), for generated
data and filters, on PostgreSQL (through PgBouncer) and SQLite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.config import Settings
from tests.support.app import app_client, changed

WORDS = ["oak", "pine", "steel", "blue", "ß", "100%", "a_b", "Oak", "lamp"]


async def _seed(client: httpx.AsyncClient, rows: list[tuple[str, str, int, bool]]) -> None:
    for name, description, price, active in rows:
        made = await client.post(
            "/v1/items",
            json={"name": name, "description": description, "price": price, "is_active": active},
        )
        assert made.status_code == 201, made.text


async def _all_pages(client: httpx.AsyncClient, params: dict[str, Any]) -> list[list[str]]:
    """Every page, by cursor and by page number: the ids of each."""
    by_cursor: list[list[str]] = []
    cursor: str | None = None
    while True:
        got = await client.get(
            "/v1/items", params={**params, **({"cursor": cursor} if cursor else {})}
        )
        assert got.status_code == 200, got.text
        body = got.json()
        by_cursor.append([item["id"] for item in body["data"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    by_number = []
    for page in range(1, len(by_cursor) + 1):
        got = await client.get("/v1/items", params={**params, "page": page})
        by_number.append([item["id"] for item in got.json()["data"]])
    assert by_number == by_cursor
    return by_cursor


filters = st.fixed_dictionaries(
    {},
    optional={
        "q": st.sampled_from([*WORDS, "e", "pin", "zzz"]),
        "is_active": st.booleans(),
        "min_price": st.integers(0, 60),
        "max_price": st.integers(40, 100),
        "sort": st.sampled_from(["created_at", "-created_at", "name", "-name", "price", "-price"]),
    },
)


@pytest.fixture
async def two_windows(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, ...]]:
    """One service whose window answers every list, one whose window answers almost none."""
    rows = [
        (
            f"{WORDS[i % len(WORDS)]} {i}",
            f"{WORDS[(i * 7) % len(WORDS)]} thing",
            (i * 37) % 101,
            i % 3 != 0,
        )
        for i in range(260)
    ]
    wide = changed(settings, list_window=100000)
    narrow = changed(settings, list_window=100)
    async with app_client(wide) as a, app_client(narrow) as b:
        await _seed(a, rows)
        yield a, b


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(params=filters, per_page=st.integers(1, 40))
async def test_every_plan_gives_the_same_pages(
    two_windows: tuple[httpx.AsyncClient, ...], params: dict[str, Any], per_page: int
) -> None:
    a, b = two_windows
    query = {**params, "per_page": per_page}
    assert await _all_pages(a, query) == await _all_pages(b, query), query


async def test_an_expensive_query_past_its_time_is_422_and_a_full_gate_503(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.services import admission

    slow = changed(settings, list_window=100, expensive_query_timeout=0.000001)
    async with app_client(slow) as client:
        await _seed(client, [(f"item {i}", "", i, True) for i in range(3)])
        # Two letters: no trigram to look up, so never tried quickly: straight to the gate.
        refused = await client.get("/v1/items", params={"q": "zz"})
        assert refused.status_code == 422, refused.text
        assert refused.json()["errors"][0]["field"] == "q"
        assert "narrow it" in refused.json()["detail"]
        # Three: the indexes answer it within the quick attempt, the gate is not involved
        # (given a generous attempt here: a loaded test machine is not the point).
        monkeypatch.setattr(admission, "QUICK_SECONDS", 5.0)
        quick = await client.get("/v1/items", params={"q": "zzz"})
        assert quick.status_code == 200, quick.text
        # A quick attempt that runs out of time falls back to the gate (and its bound).
        monkeypatch.setattr(admission, "QUICK_SECONDS", 1e-9)
        fell_back = await client.get("/v1/items", params={"q": "zzz"})
        assert fell_back.status_code == 422, fell_back.text
        cheap = await client.get("/v1/items")  # an unfiltered list is not expensive
        assert cheap.status_code == 200
