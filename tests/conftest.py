from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# Imports of the app, the harness and their drivers happen in the fixtures that need them, so
# that the unit tier (tests/unit, `make test-fast`) loads none of it.
if TYPE_CHECKING:
    import httpx

    from app.config import Settings
    from harness.pgbouncer import PgBouncer
    from harness.postgres import PostgresServer


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresServer]:
    from harness.postgres import start_or_find

    server = start_or_find()
    try:
        yield server
    finally:
        server.close()


def _bouncer(kind: str, pg: PostgresServer) -> Iterator[PgBouncer]:
    from tests.support.app import start_bouncer

    bouncer = start_bouncer(kind, pg)
    try:
        yield bouncer
    finally:
        bouncer.close()


@pytest.fixture(scope="session")
def pgbouncer_modern(pg: PostgresServer) -> Iterator[PgBouncer]:
    from harness.pgbouncer import MODERN

    yield from _bouncer(MODERN, pg)


@pytest.fixture(scope="session")
def pgbouncer_legacy(pg: PostgresServer) -> Iterator[PgBouncer]:
    from harness.pgbouncer import LEGACY

    yield from _bouncer(LEGACY, pg)


@pytest.fixture(scope="session")
def schema_db(pg: PostgresServer) -> str:
    """One migrated database shared by the API tests (tables are emptied per test)."""
    from app.db.migrations import migrate
    from harness.processes import run_coroutine

    name = pg.create_database()
    run_coroutine(lambda: migrate(pg.url(name)))
    return name


@pytest.fixture(params=["postgres", "sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def settings(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    from app.db.migrations import migrate
    from tests.support.app import make_settings, through, truncate

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
    from tests.support.app import app_client

    async with app_client(settings) as client:
        yield client


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests parametrized onto PostgreSQL need it: mark them, so that `-m "not postgres"`
    (make test-sqlite) leaves them out."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "postgres":
            item.add_marker(pytest.mark.postgres)
