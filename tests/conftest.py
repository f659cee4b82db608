from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from app.db.migrations import migrate
from harness.pgbouncer import LEGACY, MODERN, PgBouncer
from harness.postgres import PostgresServer, start_or_find
from harness.processes import run_coroutine
from tests.support.app import app_client, make_settings, start_bouncer, through, truncate


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresServer]:
    server = start_or_find()
    try:
        yield server
    finally:
        server.close()


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


@pytest.fixture(params=["postgres", "sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def settings(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'items.db'}"
        await migrate(make_settings(url).db.app_url)
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
