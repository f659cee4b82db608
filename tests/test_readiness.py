"""Readiness during upgrades and under load.

- Expand/contract: a database *ahead* of this code (a revision it does not know: a newer
  release migrated, or this release was rolled back) is ready and serves; one *behind* it
  (or empty) is not ready, and says why. Without this, a schema-changing `helm upgrade` takes
  every old pod out of the Service and a rollback never becomes ready.
- The probe has a connection of its own: a saturated request pool does not make it queue.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from app.db.migrations import head_revision, migrate
from harness.pgbouncer import PgBouncer
from harness.postgres import PostgresServer
from harness.servers import clean_env, run_cli
from tests.support.app import app_client, make_settings, through

pytestmark = pytest.mark.postgres

UNKNOWN_NEWER = "20991231_9999"  # what a later release's migration might be called


@pytest.fixture
async def database(pg: PostgresServer) -> AsyncIterator[str]:
    name = pg.create_database("itemstream_ready")
    await migrate(pg.url(name))
    try:
        yield name
    finally:
        pg.drop_database(name)


async def _stamp(pg: PostgresServer, database: str, revision: str) -> None:
    conn = await asyncpg.connect(host=pg.host, port=pg.port, user="postgres", database=database)
    try:
        await conn.execute("UPDATE alembic_version SET version_num = $1", revision)
    finally:
        await conn.close()


async def test_database_ahead_of_this_release_is_ready_and_serves(
    pg: PostgresServer, database: str
) -> None:
    await _stamp(pg, database, UNKNOWN_NEWER)
    async with app_client(make_settings(pg.url(database))) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert "ahead of this release" in ready.json()["detail"]
        created = await client.post("/v1/items", json={"name": "after upgrade", "price": 1})
        assert created.status_code == 201
        assert (await client.get(created.headers["location"])).status_code == 200


@pytest.mark.parametrize("revision", ["0001", "0002"])
async def test_database_behind_this_release_is_not_ready(
    pg: PostgresServer, database: str, revision: str
) -> None:
    await _stamp(pg, database, revision)
    async with app_client(make_settings(pg.url(database))) as client:
        ready = await client.get("/readyz")
    assert ready.status_code == 503
    detail = ready.json()["detail"]
    assert f"schema at {revision}, behind this release's {head_revision()}" in detail
    assert "itemstream migrate" in detail


async def test_empty_database_is_not_ready_and_says_what_to_run(pg: PostgresServer) -> None:
    name = pg.create_database("itemstream_empty")
    try:
        async with app_client(make_settings(pg.url(name))) as client:
            ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert "no schema" in ready.json()["detail"]
        assert "itemstream migrate" in ready.json()["detail"]
    finally:
        pg.drop_database(name)


async def test_wait_for_migrations_accepts_a_newer_schema_and_waits_for_an_older_one(
    pg: PostgresServer, database: str
) -> None:
    """The init container's rule is readiness's rule: pods of a rolled-back release start."""
    env = clean_env(DATABASE_URL=pg.url(database).render_as_string(hide_password=False))
    await _stamp(pg, database, UNKNOWN_NEWER)
    ahead = run_cli("wait-for-migrations", "--timeout", "10", env=env)
    assert ahead.returncode == 0, ahead.stderr
    await _stamp(pg, database, "0001")
    behind = run_cli("wait-for-migrations", "--timeout", "1", env=env)
    assert behind.returncode == 1
    assert "behind this release" in behind.stdout + behind.stderr


async def test_readiness_answers_while_the_request_pool_is_exhausted(
    pg: PostgresServer, database: str, pgbouncer_modern: PgBouncer
) -> None:
    """Requests hold the only pooled connection (blocked on a table lock) while the probe
    comes: it must answer 200 within READINESS_TIMEOUT, not queue behind them."""
    settings = through(
        pgbouncer_modern,
        pg,
        database,
        db_pool_size=1,
        db_max_overflow=0,
        db_pool_timeout=8.0,
        readiness_timeout=2.0,
    )
    locker = await asyncpg.connect(host=pg.host, port=pg.port, user="postgres", database=database)
    try:
        async with app_client(settings) as client:
            assert (await client.get("/readyz")).status_code == 200
            transaction = locker.transaction()
            await transaction.start()
            await locker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
            blocked = [asyncio.create_task(client.get("/v1/items")) for _ in range(3)]
            await asyncio.sleep(0.5)  # the pool's one connection is now waiting on the lock
            assert not any(task.done() for task in blocked)
            started = time.monotonic()
            probe = await client.get("/readyz")
            elapsed = time.monotonic() - started
            await transaction.rollback()
            results = await asyncio.gather(*blocked)
        assert probe.status_code == 200, probe.text
        assert elapsed < 2.0, elapsed
        assert [r.status_code for r in results] == [200, 200, 200]
    finally:
        await locker.close()
