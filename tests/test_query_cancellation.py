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


@pytest.fixture(scope="module")
def database(pg: PostgresServer) -> str:
    """A database of this module's own: the lock it takes and the statements it counts must not
    meet another test's (the shared one once held a leftover client that skewed the count)."""
    from app.db.migrations import migrate

    name = pg.create_database()
    run_coroutine(lambda: migrate(pg.url(name)))
    return name


@pytest.fixture(scope="module")
def bouncers(pg: PostgresServer) -> Iterator[dict[str, PgBouncer]]:
    """PgBouncers of their own, for the same reason (no pool state from earlier tests)."""
    from harness.pgbouncer import LEGACY, MODERN
    from tests.support.app import start_bouncer

    started = {"pgbouncer": start_bouncer(MODERN, pg)}
    try:
        started["pgbouncer-legacy"] = start_bouncer(LEGACY, pg)
        yield started
    finally:
        for bouncer in started.values():
            bouncer.close()


def _activity(pg: PostgresServer, database: str) -> list[str]:
    """What the database's sessions are doing, for a failure's message."""

    async def rows() -> list[str]:
        conn = await asyncpg.connect(_dsn(pg, database))
        try:
            found = await conn.fetch(
                "SELECT state, wait_event_type, wait_event, left(query, 80) AS query"
                " FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                database,
            )
            return [str(dict(row)) for row in found]
        finally:
            await conn.close()

    return run_coroutine(rows)


def _leave_during_query(server: Server, pg: PostgresServer, database: str) -> None:
    port = int(server.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(f"GET {SEARCH} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        if not wait_until(lambda: _waiting(pg, database) == 1, 10):
            pytest.fail(
                "the search never started (or not alone); sessions: "
                f"{_activity(pg, database)}\nservice log:\n{server.output()[-3000:]}"
            )
    # The client is gone: within a second the search is no longer running in PostgreSQL.
    time.sleep(1.0)
    assert _waiting(pg, database) == 0, "the search of a client that left is still running"


@pytest.mark.parametrize("kind", ["direct", "pgbouncer", "pgbouncer-legacy"])
def test_a_search_whose_client_leaves_or_times_out_stops_in_postgres(
    kind: str, pg: PostgresServer, database: str, bouncers: dict[str, PgBouncer]
) -> None:
    with serve(_service(kind, pg, database, bouncers)) as server:
        with _table_locked(pg, database):
            _leave_during_query(server, pg, database)

            started = time.monotonic()
            answer = httpx.get(server.base + SEARCH, timeout=30)
            waited = time.monotonic() - started
            assert answer.status_code == 503, answer.text
            assert 2.5 < waited < 5, waited  # DB_REQUEST_TIMEOUT is 3 s
            time.sleep(1.0)
            assert _waiting(pg, database) == 0, "the timed-out search is still running"

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
