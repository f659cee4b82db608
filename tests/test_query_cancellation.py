"""A request that ends leaves nothing running in PostgreSQL: a search whose client disconnects,
or whose DB_REQUEST_TIMEOUT fires, is cancelled on the server within a second, directly and
through both PgBouncer generations (the service as it runs: gunicorn, two workers).

The search is made to hang by a lock another session holds on the table (the query waits
for it in pg_stat_activity), so the test needs no large table and the query would run for as
long as the lock is held. Before the fix both cases left the query waiting: the client's
departure was noticed by nobody (uvicorn tells only an app that reads `receive`), and a
timed-out connection was cut before asyncpg's cancel request went out (app.db.pool)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg
import httpx
import pytest

from harness.pgbouncer import PgBouncer
from harness.postgres import PostgresServer
from harness.processes import run_coroutine, wait_until
from harness.servers import Server, clean_env, pooled_env, serve

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

SEARCH = "/v1/items?q=cancelled-search&per_page=5"


def _dsn(pg: PostgresServer, database: str) -> str:
    return pg.url(database).set(drivername="postgresql").render_as_string(hide_password=False)


def _waiting(pg: PostgresServer, database: str) -> int:
    """Statements of the service's database that wait on a lock."""

    async def count() -> int:
        conn = await asyncpg.connect(_dsn(pg, database))
        try:
            found: int = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND state = 'active'"
                " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
                database,
            )
            return found
        finally:
            await conn.close()

    return run_coroutine(count)


@contextmanager
def _table_locked(pg: PostgresServer, database: str) -> Iterator[None]:
    """ACCESS EXCLUSIVE on items, held by a connection of the test until the block ends."""
    import asyncio
    import threading

    locked, release = threading.Event(), threading.Event()

    async def hold() -> None:
        conn = await asyncpg.connect(_dsn(pg, database))
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
                locked.set()
                while not release.is_set():  # a thread's event, polled
                    await asyncio.sleep(0.02)
        finally:
            await conn.close()

    holder = threading.Thread(target=lambda: asyncio.run(hold()), daemon=True)
    holder.start()
    assert locked.wait(10), "could not lock the table"
    try:
        yield
    finally:
        release.set()
        holder.join(10)


def _service(
    kind: str, pg: PostgresServer, database: str, bouncers: dict[str, PgBouncer]
) -> dict[str, str]:
    values = {"DB_REQUEST_TIMEOUT": "3", "DB_STATEMENT_TIMEOUT": "3", "LOG_LEVEL": "INFO"}
    if kind == "direct":
        url = pg.url(database).render_as_string(hide_password=False)
        return clean_env(DATABASE_URL=url, WEB_CONCURRENCY="2", **values)
    env = pooled_env(pg, bouncers[kind], database, **values)
    if kind == "pgbouncer-legacy":
        env["DB_POOLER"] = "pgbouncer-legacy"
    return env


@pytest.fixture
def bouncers(pgbouncer_modern: PgBouncer, pgbouncer_legacy: PgBouncer) -> dict[str, PgBouncer]:
    return {"pgbouncer": pgbouncer_modern, "pgbouncer-legacy": pgbouncer_legacy}


def _leave_during_query(server: Server, pg: PostgresServer, database: str) -> None:
    port = int(server.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(f"GET {SEARCH} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        assert wait_until(lambda: _waiting(pg, database) == 1, 10), "the search never started"
    # The client is gone: within a second the search is no longer running in PostgreSQL.
    time.sleep(1.0)
    assert _waiting(pg, database) == 0, "the search of a client that left is still running"


@pytest.mark.parametrize("kind", ["direct", "pgbouncer", "pgbouncer-legacy"])
def test_a_search_whose_client_leaves_or_times_out_stops_in_postgres(
    kind: str, pg: PostgresServer, schema_db: str, bouncers: dict[str, PgBouncer]
) -> None:
    with serve(_service(kind, pg, schema_db, bouncers)) as server:
        with _table_locked(pg, schema_db):
            _leave_during_query(server, pg, schema_db)

            started = time.monotonic()
            answer = httpx.get(server.base + SEARCH, timeout=30)
            waited = time.monotonic() - started
            assert answer.status_code == 503, answer.text
            assert 2.5 < waited < 5, waited  # DB_REQUEST_TIMEOUT is 3 s
            time.sleep(1.0)
            assert _waiting(pg, schema_db) == 0, "the timed-out search is still running"

        # The departure is the client's (499), not a server error.
        scrape = httpx.get(server.base + "/metrics").text
        listed = [
            line
            for line in scrape.splitlines()
            if line.startswith("http_requests_total") and 'handler="/v1/items"' in line
        ]
        assert any('status="499"' in line for line in listed), listed
        # Nothing was lost on the way: every worker's pool still serves.
        for _ in range(20):
            assert httpx.get(server.base + SEARCH, timeout=10).status_code == 200
