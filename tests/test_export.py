"""The NDJSON/CSV export: correct rows in both formats on both backends and through both
PgBouncer generations, flat memory for 100k rows in a real gunicorn worker, and a client that
leaves midway stops the query."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from app.db.migrations import migrate
from harness.pgbouncer import LEGACY, MODERN
from harness.postgres import PostgresServer
from harness.processes import memory_kib, run_coroutine, wait_until, worker_pids
from harness.servers import pooled_env, serve
from tests.support.app import make_settings, start_bouncer, through
from tests.support.http_servers import running_app

BIG = 100_000


async def _seed_api(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    created = []
    for index in range(30):
        body = {
            "name": f'item {index:02d}, "quoted"\nline' if index == 7 else f"item {index:02d}",
            "price": index,
            "is_active": index % 3 != 0,
            "description": "with \\ backslash and é" if index == 5 else None,
        }
        created.append((await client.post("/v1/items", json=body)).json())
    await client.delete(f"/v1/items/{created[4]['id']}")
    return created


async def _check_export(client: httpx.AsyncClient) -> None:
    await _seed_api(client)
    params = {"is_active": "true", "min_price": "2", "sort": "price"}
    listed = (await client.get("/v1/items", params={**params, "per_page": 100})).json()["data"]
    assert len(listed) == 18  # 20 active, minus price 1, minus the deleted one

    response = await client.get("/v1/items/export", params=params)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    rows = [json.loads(line) for line in response.text.splitlines()]
    assert [row["id"] for row in rows] == [item["id"] for item in listed]
    for row, item in zip(rows, listed, strict=True):
        assert row["name"] == item["name"]
        assert row["description"] == item["description"]
        assert float(row["price"]) == item["price"]
        assert row["is_active"] is True
        assert row["created_at"].endswith("Z")
        assert _instant(row["created_at"]) == _instant(item["created_at"])

    as_csv = await client.get("/v1/items/export", params=params, headers={"Accept": "text/csv"})
    assert as_csv.headers["content-type"].startswith("text/csv")
    assert 'filename="items.csv"' in as_csv.headers["content-disposition"]
    table = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [row["id"] for row in table] == [item["id"] for item in listed]
    assert {row["is_active"] for row in table} == {"true"}
    # Quotes, commas, newlines, backslashes and non-ASCII survive.
    assert [row["name"] for row in table] == [item["name"] for item in listed]
    assert [row["description"] or None for row in table] == [i["description"] for i in listed]

    everything = await client.get("/v1/items/export", params={"include_deleted": "true"})
    assert len(everything.text.splitlines()) == 30
    bad = await client.get("/v1/items/export", params={"format": "xml"})
    assert bad.status_code == 422


def _instant(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def test_export_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'e.db'}"
    await migrate(make_settings(url).db.app_url)
    async with running_app(make_settings(url)) as base, httpx.AsyncClient(base_url=base) as c:
        await _check_export(c)


@pytest.mark.postgres
@pytest.mark.parametrize("kind", [MODERN, LEGACY])
async def test_export_through_pgbouncer(pg: PostgresServer, kind: str) -> None:
    database = pg.create_database()
    bouncer = start_bouncer(kind, pg)
    try:
        await migrate(pg.url(database))
        settings = through(bouncer, pg, database)
        async with running_app(settings) as base, httpx.AsyncClient(base_url=base) as client:
            await _check_export(client)
    finally:
        bouncer.close()
        pg.drop_database(database)


# --- 100k rows through a real gunicorn worker -----------------------------------------------


@pytest.fixture(scope="module")
def big_db(pg: PostgresServer) -> Iterator[str]:
    database = pg.create_database()
    run_coroutine(lambda: migrate(pg.url(database)))
    run_coroutine(lambda: _seed_sql(pg, database, BIG))
    try:
        yield database
    finally:
        pg.drop_database(database)


async def _seed_sql(pg: PostgresServer, database: str, count: int) -> None:
    conn = await asyncpg.connect(
        host=pg.host, port=pg.port, user=pg.admin_url.username, database=database
    )
    try:
        await conn.execute(
            """
            INSERT INTO items (id, name, description, price, is_active, version,
                               created_at, updated_at)
            SELECT gen_random_uuid(), 'item ' || n, repeat('d', n % 2000), (n % 10000) / 100.0,
                   n % 2 = 0, 1, now() - n * interval '1 second', now()
            FROM generate_series(1, $1) AS n
            """,
            count,
        )
    finally:
        await conn.close()


@pytest.mark.postgres
@pytest.mark.slow
def test_big_export_streams_in_flat_memory_and_stops_on_disconnect(
    pg: PostgresServer, big_db: str
) -> None:
    bouncer = start_bouncer(MODERN, pg)
    try:
        env = pooled_env(pg, bouncer, big_db, WEB_CONCURRENCY="1")
        with serve(env) as server:
            (worker,) = worker_pids(server.proc.pid)
            httpx.get(f"{server.base}/v1/items", params={"per_page": 100}).raise_for_status()
            before = memory_kib(worker, "VmRSS")
            rows = 0
            started = time.monotonic()
            with httpx.stream("GET", f"{server.base}/v1/items/export", timeout=120) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line:
                        rows += 1
            elapsed = time.monotonic() - started
            peak = memory_kib(worker, "VmHWM")
            assert rows == BIG
            growth_mib = (peak - before) / 1024
            print(f"export: {rows} rows in {elapsed:.2f}s, worker peak RSS +{growth_mib:.1f} MiB")
            # Buffering the export would cost over 100 MB (the NDJSON alone is about 110 MB).
            assert growth_mib < 25, f"worker RSS grew by {growth_mib:.1f} MiB"

            with httpx.stream("GET", f"{server.base}/v1/items/export", timeout=30) as response:
                # Held, not dropped: a dropped iterator is collected at once, and closing it
                # closes the connection (the server would rightly see the client leave).
                chunks = response.iter_bytes()
                next(chunks)
                # Backpressure holds the COPY on the server while the client reads nothing.
                copying = _copying(pg, big_db)
                assert len(copying) == 1, "no COPY running while the client holds the export"
            # The client left after the first chunk: the COPY must stop, not run to its end.
            assert _stopped(pg, big_db, copying[0]), "the export query kept running"
            assert httpx.get(f"{server.base}/readyz").status_code == 200
    finally:
        bouncer.close()


def _copying(pg: PostgresServer, database: str) -> list[int]:
    """The backends running a COPY, once there is one (within 5 s: the server starts the COPY
    a moment after the first bytes reach the client)."""
    found: list[int] = []

    def seen() -> bool:
        found[:] = run_coroutine(lambda: _copy_backends(pg, database))
        return bool(found)

    wait_until(seen, 5)
    return found


async def _copy_backends(pg: PostgresServer, database: str) -> list[int]:
    conn = await asyncpg.connect(
        host=pg.host, port=pg.port, user=pg.admin_url.username, database=database
    )
    try:
        rows = await conn.fetch(
            """SELECT pid FROM pg_stat_activity
               WHERE datname = $1 AND query ILIKE 'COPY%' AND state = 'active'""",
            database,
        )
        return [row["pid"] for row in rows]
    finally:
        await conn.close()


def _stopped(pg: PostgresServer, database: str, pid: int) -> bool:
    """The backend is gone (its connection closed), or it is idle again after a ROLLBACK
    (cancelled and rolled back; PgBouncer keeps the clean server connection). A COPY that
    had run to its end would have committed instead."""

    async def stopped() -> bool:
        conn = await asyncpg.connect(
            host=pg.host, port=pg.port, user=pg.admin_url.username, database=database
        )
        try:
            row = await conn.fetchrow(
                "SELECT state, query FROM pg_stat_activity WHERE pid = $1", pid
            )
            return row is None or (row["state"] == "idle" and row["query"].startswith("ROLLBACK"))
        finally:
            await conn.close()

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if run_coroutine(stopped):
            return True
        time.sleep(0.05)
    return False


# --- the same rows, the same bytes ---------------------------------------------------------

TRICKY = 'q"uote \\ back/slash\nline\ttab \x01\x1f\x7f é 😀 \u2028'


def _rows() -> list[dict[str, Any]]:
    from datetime import UTC, datetime
    from decimal import Decimal
    from uuid import UUID

    base = datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=UTC)
    return [
        {
            "id": UUID(int=index + 1),
            "name": f"{TRICKY} {index}" if index % 2 else f"plain {index}",
            "description": TRICKY if index == 1 else None,
            "price": Decimal(index) + Decimal("0.5") if index % 3 else Decimal(index),
            "is_active": index % 2 == 0,
            "version": index + 1,
            "created_at": base,
            "updated_at": base,
            "deleted_at": base if index == 3 else None,
            "generated_text": TRICKY if index == 2 else None,
            "generation_id": UUID(int=99) if index == 2 else None,
            "created_by": "alice@example.com" if index == 1 else None,
        }
        for index in range(6)
    ]


async def _export_of(settings: Any) -> dict[str, bytes]:
    from sqlalchemy.ext.asyncio import create_async_engine

    from app.db.tables import items
    from tests.support.app import app_client

    direct = create_async_engine(settings.db.migrations_url)
    try:
        async with direct.begin() as conn:
            await conn.execute(items.insert(), _rows())
    finally:
        await direct.dispose()
    async with app_client(settings) as client:
        params = {"include_deleted": "true", "sort": "name"}
        ndjson = await client.get("/v1/items/export", params=params)
        as_csv = await client.get("/v1/items/export", params={**params, "format": "csv"})
    return {"ndjson": ndjson.content, "csv": as_csv.content}


@pytest.mark.postgres
async def test_the_same_rows_export_to_the_same_bytes_on_both_backends(
    pg: PostgresServer, tmp_path: Path
) -> None:
    sqlite_url = f"sqlite+aiosqlite:///{tmp_path / 'same.db'}"
    await migrate(make_settings(sqlite_url).db.app_url)
    database = pg.create_database("itemstream_same")
    bouncer = start_bouncer(MODERN, pg)
    try:
        await migrate(pg.url(database))
        on_sqlite = await _export_of(make_settings(sqlite_url))
        on_postgres = await _export_of(through(bouncer, pg, database))
    finally:
        bouncer.close()
        pg.drop_database(database)
    assert on_sqlite["ndjson"] == on_postgres["ndjson"]
    assert on_sqlite["csv"] == on_postgres["csv"]
    first = json.loads(on_postgres["ndjson"].splitlines()[1])
    assert set(first) >= {"created_by", "generated_text", "generation_id"}
    assert len(on_postgres["ndjson"].splitlines()) == 6
