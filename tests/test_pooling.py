"""Concurrency through every way of reaching Postgres: direct, PgBouncer >= 1.21 with prepared
statements, and PgBouncer < 1.21 in compatibility mode. Plus outage and recovery."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator

import asyncpg
import httpx
import pytest

from app.config import Settings
from harness.pgbouncer import LEGACY, MODERN, PgBouncer
from harness.postgres import PostgresServer
from harness.processes import free_port
from tests.support.app import app_client, changed, make_settings, start_bouncer, through, truncate

pytestmark = pytest.mark.postgres


@pytest.fixture(params=["direct", MODERN, LEGACY])
async def pooled_settings(
    request: pytest.FixtureRequest, pg: PostgresServer, schema_db: str
) -> Settings:
    await truncate(pg, schema_db)
    if request.param == "direct":
        return make_settings(pg.url(schema_db))
    bouncer: PgBouncer = request.getfixturevalue(f"pgbouncer_{request.param}")
    return through(bouncer, pg, schema_db)


async def test_concurrent_identical_idempotent_posts_store_one_row(
    pooled_settings: Settings,
) -> None:
    async with app_client(pooled_settings) as client:
        body = {"name": "once", "price": 3}
        responses = await asyncio.gather(
            *(
                client.post("/v1/items", json=body, headers={"Idempotency-Key": "same"})
                for _ in range(16)
            )
        )
        assert [r.status_code for r in responses] == [201] * 16, [
            r.text for r in responses if r.status_code != 201
        ]
        assert len({r.json()["id"] for r in responses}) == 1
        assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 15
        listing = (await client.get("/v1/items?include_deleted=true&include_total=true")).json()
        assert listing["total"] == 1


async def test_concurrent_patch_with_same_if_match_has_one_winner(
    pooled_settings: Settings,
) -> None:
    async with app_client(pooled_settings) as client:
        item = (await client.post("/v1/items", json={"name": "contested", "price": 1})).json()
        url = f"/v1/items/{item['id']}"
        responses = await asyncio.gather(
            *(
                client.patch(url, json={"price": n}, headers={"If-Match": '"1"'})
                for n in range(2, 14)
            )
        )
        statuses = Counter(r.status_code for r in responses)
        assert statuses == {200: 1, 412: 11}, statuses
        winner = next(r for r in responses if r.status_code == 200).json()
        final = (await client.get(url)).json()
        assert final["version"] == 2 and final["price"] == winner["price"]


async def mixed_workload(client: httpx.AsyncClient, rounds: int = 30) -> Counter[int]:
    statuses: Counter[int] = Counter()

    async def worker(index: int) -> None:
        for step in range(rounds):
            created = await client.post(
                "/v1/items", json={"name": f"w{index}-{step}", "price": step}
            )
            statuses[created.status_code] += 1
            if created.status_code != 201:
                continue
            item_id = created.json()["id"]
            for response in (
                await client.get(f"/v1/items/{item_id}"),
                await client.get("/v1/items", params={"q": f"w{index}", "per_page": 5}),
                await client.patch(f"/v1/items/{item_id}", json={"price": step + 1}),
            ):
                statuses[response.status_code] += 1

    await asyncio.gather(*(worker(index) for index in range(12)))
    return statuses


async def test_mixed_concurrent_workload_has_no_errors(pooled_settings: Settings) -> None:
    async with app_client(pooled_settings) as client:
        statuses = await mixed_workload(client)
    assert set(statuses) == {200, 201}, statuses


async def _statements_per_server_connection(
    bouncer: PgBouncer, pg: PostgresServer, database: str
) -> list[int]:
    """Open many clients at once so each lands on its own server connection, and count the
    named prepared statements each server connection still holds."""
    connections = await asyncio.gather(
        *(
            asyncpg.connect(
                host="127.0.0.1",
                port=bouncer.port,
                user=pg.admin_url.username,
                database=database,
                statement_cache_size=0,
            )
            for _ in range(10)
        )
    )
    try:

        async def count(conn: asyncpg.Connection) -> int:
            async with conn.transaction():
                value = await conn.fetchval("SELECT count(*) FROM pg_prepared_statements")
                await asyncio.sleep(0.2)  # keep the server connection busy so the others spread
                return int(value)

        return list(await asyncio.gather(*(count(conn) for conn in connections)))
    finally:
        await asyncio.gather(*(conn.close() for conn in connections))


async def test_legacy_mode_leaves_no_prepared_statements_behind(
    pgbouncer_legacy: PgBouncer, pg: PostgresServer, schema_db: str
) -> None:
    await truncate(pg, schema_db)
    async with app_client(through(pgbouncer_legacy, pg, schema_db)) as client:
        assert set(await mixed_workload(client, rounds=10)) == {200, 201}
    counts = await _statements_per_server_connection(pgbouncer_legacy, pg, schema_db)
    assert max(counts) == 0, counts


async def test_control_default_mode_fails_on_old_pgbouncer(
    pgbouncer_legacy: PgBouncer, pg: PostgresServer, schema_db: str
) -> None:
    """Why DB_POOLER=pgbouncer-legacy exists: with prepared-statement caching on, PgBouncer
    < 1.21 hands statements to server connections that never prepared them."""
    await truncate(pg, schema_db)
    wrong = changed(through(pgbouncer_legacy, pg, schema_db), db_pooler="pgbouncer")
    async with app_client(wrong) as client:
        statuses = await mixed_workload(client, rounds=10)
    assert set(statuses) - {200, 201}, statuses


# --- outages ------------------------------------------------------------------------------


@pytest.fixture
def own_bouncer(pg: PostgresServer) -> Iterator[PgBouncer]:
    bouncer = start_bouncer(MODERN, pg)
    try:
        yield bouncer
    finally:
        bouncer.close()


async def _timed(client: httpx.AsyncClient, url: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await client.get(url)
    return response, time.monotonic() - started


async def test_pgbouncer_down_gives_fast_503_then_recovers(
    own_bouncer: PgBouncer, pg: PostgresServer, schema_db: str
) -> None:
    async with app_client(through(own_bouncer, pg, schema_db)) as client:
        assert (await client.get("/v1/items")).status_code == 200  # the pool holds connections
        own_bouncer.stop()
        for url in ("/v1/items", "/v1/items", "/readyz"):
            response, elapsed = await _timed(client, url)
            assert response.status_code == 503, response.text
            assert elapsed < 2.0, elapsed
            if url != "/readyz":
                assert response.headers["retry-after"] == "1"
                assert response.headers["content-type"] == "application/problem+json"
                assert "unavailable" in response.json()["detail"]
        create = await client.post("/v1/items", json={"name": "during outage", "price": 1})
        assert create.status_code == 503
        assert (await client.get("/livez")).status_code == 200

        own_bouncer.start()
        deadline = time.monotonic() + 10
        statuses = []
        while time.monotonic() < deadline:
            statuses.append((await client.get("/v1/items")).status_code)
            if statuses[-1] == 200:
                break
            await asyncio.sleep(0.2)
        assert statuses[-1] == 200, statuses
        assert (await client.get("/readyz")).status_code == 200
        # Nothing from the outage was half-written.
        assert "during outage" not in (await client.get("/v1/items?q=outage")).text


async def test_postgres_unreachable_behind_pgbouncer_fails_fast(
    pg: PostgresServer, schema_db: str
) -> None:
    dead = start_bouncer(MODERN, pg, server_port=free_port())  # nothing listens there
    try:
        settings = through(dead, pg, schema_db, db_statement_timeout=1.5)
        async with app_client(settings) as client:
            response, elapsed = await _timed(client, "/v1/items")
        assert response.status_code == 503, response.text
        assert elapsed < 4.0, elapsed
    finally:
        dead.close()
