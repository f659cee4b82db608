from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import URL

from app.config import Settings
from app.db.migrations import migrate
from app.main import create_app
from tests.support.pgbouncer import LEGACY, MODERN, PgBouncer, find_binary
from tests.support.postgres import PostgresServer, start_or_find
from tests.support.processes import missing, run_coroutine


def make_settings(url: URL | str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "environment": "test",
        "database_url": url if isinstance(url, str) else url.render_as_string(hide_password=False),
        "db_pool_timeout": 3.0,
        "db_connect_timeout": 3.0,
        "db_statement_timeout": 10.0,
        "db_request_timeout": 10.0,
        "db_retry_after_seconds": 1,
        **overrides,
    }
    return Settings(_env_file=None, **values)


@asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The real app with its lifespan, over ASGI (no network)."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresServer]:
    server = start_or_find()
    try:
        yield server
    finally:
        server.close()


def start_bouncer(kind: str, pg: PostgresServer, *, server_port: int | None = None) -> PgBouncer:
    """A fresh PgBouncer of `kind` in front of `pg` (or of `server_port`), or skip/fail."""
    binary = find_binary(kind)
    if binary is None:
        version = ">= 1.21" if kind == MODERN else "< 1.21"
        missing(f"no {kind} PgBouncer ({version}); set PGBOUNCER_{kind.upper()} or run `make test`")
    assert binary is not None
    port = server_port or pg.port
    return PgBouncer(binary=binary, kind=kind, server_host=pg.host, server_port=port).start()


def _bouncer(kind: str, pg: PostgresServer) -> Iterator[PgBouncer]:
    bouncer = start_bouncer(kind, pg)
    try:
        yield bouncer
    finally:
        bouncer.close()


@pytest.fixture(scope="session")
def pgbouncer_modern(pg: PostgresServer) -> Iterator[PgBouncer]:
    yield from _bouncer(MODERN, pg)


@pytest.fixture(scope="session")
def pgbouncer_legacy(pg: PostgresServer) -> Iterator[PgBouncer]:
    yield from _bouncer(LEGACY, pg)


@pytest.fixture(scope="session")
def schema_db(pg: PostgresServer) -> str:
    """One migrated database shared by the API tests (tables are emptied per test)."""
    name = pg.create_database()
    run_coroutine(lambda: migrate(pg.url(name)))
    return name


async def truncate(pg: PostgresServer, database: str) -> None:
    conn = await asyncpg.connect(
        host=pg.host, port=pg.port, user=pg.admin_url.username, database=database
    )
    try:
        await conn.execute("TRUNCATE items, idempotency_keys, generations")
    finally:
        await conn.close()


def through(bouncer: PgBouncer, pg: PostgresServer, database: str, **overrides: Any) -> Settings:
    """Settings for the app reaching `database` through `bouncer`, migrations direct."""
    return make_settings(
        pg.url(database, host="127.0.0.1", port=bouncer.port),
        db_pooler=bouncer.pooler_setting,
        migration_database_url=pg.url(database).render_as_string(hide_password=False),
        **overrides,
    )


@pytest.fixture(params=["postgres", "sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def settings(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'items.db'}"
        await migrate(make_settings(url).database)
        return make_settings(url)
    pg: PostgresServer = request.getfixturevalue("pg")
    bouncer: PgBouncer = request.getfixturevalue("pgbouncer_modern")
    database: str = request.getfixturevalue("schema_db")
    await truncate(pg, database)
    return through(bouncer, pg, database)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(settings) as client:
        yield client


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests parametrized onto PostgreSQL need it: mark them, so that `-m "not postgres"`
    (make test-fast) leaves them out."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "postgres":
            item.add_marker(pytest.mark.postgres)
