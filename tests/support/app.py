"""The app and its database for tests: settings, an in-process client, PgBouncer and
PostgreSQL helpers. Imported by tests and fixtures alike (never from conftest)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
from sqlalchemy.engine import URL

from app.config import Settings
from app.main import create_app
from harness.pgbouncer import MODERN, PgBouncer, find_binary
from harness.postgres import PostgresServer
from tests.support.skips import missing


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


def changed(settings: Settings, **variables: Any) -> Settings:
    """`settings` with some variables (flat names, as in the environment) set otherwise,
    validated again."""
    current = {name.lower(): value for name, value in settings.variables().items()}
    return Settings(_env_file=None, **{**current, **variables})


@asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The real app with its lifespan, over ASGI (no network)."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def start_bouncer(kind: str, pg: PostgresServer, *, server_port: int | None = None) -> PgBouncer:
    """A fresh PgBouncer of `kind` in front of `pg` (or of `server_port`), or skip/fail."""
    binary = find_binary(kind)
    if binary is None:
        version = ">= 1.21" if kind == MODERN else "< 1.21"
        missing(f"no {kind} PgBouncer ({version}); set PGBOUNCER_{kind.upper()} or run `make test`")
    assert binary is not None
    port = server_port or pg.port
    return PgBouncer(binary=binary, kind=kind, server_host=pg.host, server_port=port).start()


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


def migrated_database(pg: PostgresServer, name: str) -> Iterator[str]:
    """A database of its own for a test module, at the schema's head; dropped afterwards."""
    from app.db.migrations import migrate
    from harness.processes import run_coroutine

    created = pg.create_database(name)
    run_coroutine(lambda: migrate(pg.url(created)))
    yield created
    pg.drop_database(created)
