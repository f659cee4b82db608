from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, make_url
from sqlalchemy.ext.asyncio import create_async_engine

from alembic import command
from app.db.migrations import alembic_config, head_revision, migrate
from app.db.tables import metadata
from harness.postgres import PostgresServer, throwaway_cluster
from harness.servers import clean_env, run_cli

ROOT = Path(__file__).resolve().parents[1]


def _migrate_process(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "app", "migrate"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.postgres
def test_concurrent_migrate_runs_apply_exactly_once(pg: PostgresServer) -> None:
    database = pg.create_database("itemstream_migrate")
    url = pg.url(database).render_as_string(hide_password=False)
    env = clean_env(MIGRATION_DATABASE_URL=url, DATABASE_URL=url, LOG_LEVEL="INFO")
    procs = [_migrate_process(env) for _ in range(5)]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 5, outputs
    assert sum("Running upgrade" in out for out in outputs) == 1, outputs
    assert sum("migrations applied" in out for out in outputs) == 1

    assert pg.fetchval(database, "SELECT version_num FROM alembic_version") == head_revision()
    pg.drop_database(database)


def _diff(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return [
        change
        for change in compare_metadata(context, metadata)
        # Trigram indexes are Postgres-only and live in the migration, not in the table model.
        if "trgm" not in str(change)
    ]


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
async def test_migrations_round_trip_and_match_the_model(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if backend == "postgres":
        pg: PostgresServer = request.getfixturevalue("pg")
        name = pg.create_database("itemstream_roundtrip")
        url = pg.url(name)
    else:
        from sqlalchemy.engine import make_url

        url = make_url(f"sqlite+aiosqlite:///{tmp_path / 'rt.db'}")
    assert await migrate(url) is True
    assert await migrate(url) is False  # already at head: nothing to do

    engine = create_async_engine(url)
    async with engine.connect() as conn:
        assert await conn.run_sync(_diff) == []

        def downgrade(sync_conn: Connection) -> None:
            config = alembic_config()
            config.attributes["connection"] = sync_conn
            command.downgrade(config, "base")

        await conn.run_sync(downgrade)
        await conn.commit()
    await engine.dispose()
    assert await migrate(url) is True


@pytest.mark.postgres
async def test_search_uses_trigram_indexes(pg: PostgresServer) -> None:
    database = pg.create_database("itemstream_trgm")
    await migrate(pg.url(database))
    conn = await asyncpg.connect(
        host=pg.host, port=pg.port, user=pg.admin_url.username, database=database
    )
    try:
        await conn.execute(
            "INSERT INTO items (id, name, description, price, created_at, updated_at) "
            "SELECT gen_random_uuid(), 'item ' || n, 'about ' || (n % 997), n % 500, now(), now() "
            "FROM generate_series(1, 200000) AS n"
        )
        await conn.execute("ANALYZE items")
        plan = "\n".join(
            row[0]
            for row in await conn.fetch(
                "EXPLAIN SELECT id FROM items WHERE deleted_at IS NULL AND "
                "(name ILIKE '%widget%' ESCAPE '\\' OR description ILIKE '%widget%' ESCAPE '\\') "
                "ORDER BY created_at DESC, id DESC LIMIT 21"
            )
        )
    finally:
        await conn.close()
        pg.drop_database(database)
    assert "ix_items_name_trgm" in plan and "ix_items_description_trgm" in plan, plan


@pytest.mark.postgres
@pytest.mark.parametrize("sort", ["-created_at", "name", "-price"])
async def test_a_tenants_pages_are_ranges_of_its_index(pg: PostgresServer, sort: str) -> None:
    """The list query the app sends (compiled from its builder), for one tenant among many,
    first page and keyset page: an index scan in order, no sort of the tenant's rows."""
    from app.db.items import _filter_params, _page
    from app.db.session import compiled_for_postgres
    from app.domain.models import ItemFilter, Sort

    database = pg.create_database("itemstream_tenant_plan")
    await migrate(pg.url(database))
    conn = await asyncpg.connect(
        host=pg.host, port=pg.port, user=pg.admin_url.username, database=database
    )
    order = Sort(field=sort.lstrip("-"), descending=sort.startswith("-"))  # type: ignore[arg-type]
    try:
        await conn.execute(
            "INSERT INTO items (id, name, description, price, created_at, updated_at, tenant) "
            "SELECT gen_random_uuid(), 'item ' || n, 'about ' || n, n % 500, now(), now(), "
            "'tenant-' || (n % 50) FROM generate_series(1, 200000) AS n"
        )
        await conn.execute("ANALYZE items")
        for keyset in (False, True):
            shape, params = _filter_params(ItemFilter(), "tenant-7")
            page = (shape, order, keyset, "walk")  # the plan of a list that does not narrow
            sql = compiled_for_postgres(("plan", *page), _page(*page))
            values = {**params, "limit": 21, "offset": 0}
            if keyset:
                after = {"created_at": "2100-01-01", "name": "item 5", "price": 250}[order.field]
                values |= {"after_value": after, "after_id": "00000000-0000-0000-0000-000000000000"}
            args = [values[name] for name in sql.params]
            text = sql.sql
            for position in range(len(args), 0, -1):  # EXPLAIN with the values inlined
                text = text.replace(f"${position}", _literal(args[position - 1]))
            plan = "\n".join(row[0] for row in await conn.fetch("EXPLAIN " + text))
            assert f"ix_items_tenant_live_{order.field}" in plan, plan
            assert "Sort" not in plan and "Seq Scan" not in plan, plan
    finally:
        await conn.close()
        pg.drop_database(database)


def _literal(value: object) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if value is None:
        return "NULL"
    return str(value)


@pytest.mark.postgres
def test_wait_for_migrations(pg: PostgresServer, schema_db: str) -> None:
    ready = pg.url(schema_db).render_as_string(hide_password=False)
    done = run_cli("wait-for-migrations", "--timeout", "10", env=clean_env(DATABASE_URL=ready))
    assert done.returncode == 0, done.stderr
    empty = pg.create_database("itemstream_empty")
    empty_url = pg.url(empty).render_as_string(hide_password=False)
    waiting = run_cli(
        "wait-for-migrations", "--timeout", "1", env=clean_env(DATABASE_URL=empty_url)
    )
    assert waiting.returncode == 1
    assert "schema not at head" in waiting.stdout  # JSON log lines go to stdout
    pg.drop_database(empty)


@pytest.mark.postgres
async def test_readyz_is_503_before_migrations(pg: PostgresServer) -> None:
    from tests.support.app import app_client, make_settings

    empty = pg.create_database("itemstream_unmigrated")
    async with app_client(make_settings(pg.url(empty))) as client:
        response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"
    pg.drop_database(empty)


@pytest.mark.postgres
@pytest.mark.slow
def test_migrate_waits_for_a_database_that_starts_late() -> None:
    """A fresh install starts the migration Job and the database together: a cold volume, an
    image pull and initdb outlast a Job's retries. `migrate` waits (bounded, logged) instead."""
    late = throwaway_cluster(start=False)
    try:
        url = late.url("postgres").render_as_string(hide_password=False)
        env = clean_env(DATABASE_URL=url, LOG_LEVEL="INFO", MIGRATION_WAIT_SECONDS="60")
        proc = _migrate_process(env)
        time.sleep(20)
        assert proc.poll() is None, proc.communicate()[0]  # still waiting, not failed
        late.restart()
        output = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, output
        assert "database not reachable yet" in output
        assert "upgrading schema from empty" in output
    finally:
        late.close()


@pytest.mark.postgres
def test_migrate_gives_up_after_its_wait() -> None:
    never = throwaway_cluster(start=False)
    try:
        url = never.url("postgres").render_as_string(hide_password=False)
        env = clean_env(DATABASE_URL=url, MIGRATION_WAIT_SECONDS="3")
        started = time.monotonic()
        done = run_cli("migrate", env=env, timeout=30)
        assert done.returncode != 0
        assert time.monotonic() - started < 15
    finally:
        never.close()


async def test_a_migrated_sqlite_file_is_in_wal_mode_before_the_app_opens_it(
    tmp_path: Path,
) -> None:
    """Switching to WAL needs an exclusive lock and fails at once ("database is locked") when
    two connections open the file together, as the app's pool and its readiness probe do at
    start: the migration leaves the file in WAL, so the app's connections never switch."""
    path = tmp_path / "wal.db"
    await migrate(make_url(f"sqlite+aiosqlite:///{path}"))
    with sqlite3.connect(path) as plain:
        assert plain.execute("PRAGMA journal_mode").fetchone() == ("wal",)
