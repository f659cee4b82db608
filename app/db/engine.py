"""Engine construction for each way of reaching the database, and the one transaction scope
the rest of the app uses."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol
from uuid import uuid4

import asyncpg
from sqlalchemy import event, exc
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from app.config import Settings
from app.db.session import PostgresSession, Session, SqlAlchemySession

log = logging.getLogger(__name__)

# SQLSTATE classes that mean "the database is not there right now", not "your query is wrong":
# 08 connection exception, 53 insufficient resources, 57P0x shutdown/starting, 57014 cancelled
# (statement timeout), and PgBouncer's own 08P01 for "no server connection available".
_UNAVAILABLE_SQLSTATE_PREFIXES = ("08", "53", "57P0", "57014", "58")


class DatabaseUnavailable(Exception):
    """The database (or the pooler in front of it) cannot serve the request right now."""


def _unique_statement_name() -> str:
    # PgBouncer < 1.21 hands each transaction a different server connection; asyncpg's
    # per-process counter names (__asyncpg_stmt_1__) would collide between clients there.
    return f"__asyncpg_{uuid4().hex}__"


def postgres_connect_args(settings: Settings) -> dict[str, Any]:
    args: dict[str, Any] = {
        "timeout": settings.db_connect_timeout,
        # Client-side guard that also sends a cancel request; unlike a `statement_timeout`
        # startup parameter it passes through every PgBouncer version.
        "command_timeout": settings.db_statement_timeout,
        "server_settings": {"application_name": "itemstream"},
    }
    if settings.db_pooler == "none":
        timeout_ms = int(settings.db_statement_timeout * 1000)
        args["server_settings"]["statement_timeout"] = str(timeout_ms)
    elif settings.db_pooler == "pgbouncer-legacy":
        # No named statements: the app's queries go out unnamed. The two SQLAlchemy settings
        # cover what SQLAlchemy itself still executes on these connections (e.g. pre-ping).
        args["statement_cache_size"] = 0  # asyncpg's cache
        args["prepared_statement_cache_size"] = 0  # SQLAlchemy's cache
        args["prepared_statement_name_func"] = _unique_statement_name
    return args


def create_engine(settings: Settings, url: URL | None = None) -> AsyncEngine:
    """Create the app's engine. Call once per process, after any fork."""
    url = url or settings.database
    if url.get_backend_name() == "sqlite":
        engine = create_async_engine(url, connect_args={"timeout": 15})
        event.listen(engine.sync_engine, "connect", _configure_sqlite)
        return engine
    return create_async_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout,
        pool_recycle=settings.db_pool_recycle,
        pool_pre_ping=settings.db_pool_pre_ping,
        connect_args=postgres_connect_args(settings),
    )


def _configure_sqlite(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=15000")
    cursor.close()
    # SQLite's lower() folds ASCII only; ILIKE compiles to lower(x) LIKE lower(y), so give it
    # Unicode case folding to match PostgreSQL.
    raw = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    raw = getattr(raw, "_conn", raw)  # aiosqlite wraps the sqlite3 connection
    if isinstance(raw, sqlite3.Connection):
        raw.create_function("lower", 1, _unicode_lower, deterministic=True)


def _unicode_lower(value: str | None) -> str | None:
    return value.lower() if isinstance(value, str) else value


def is_unavailable_error(error: BaseException) -> bool:
    """True when an error means the database could not be reached, not that a query failed."""
    if isinstance(error, exc.TimeoutError | ConnectionError | TimeoutError):
        return True  # pool checkout timeout, refused/reset connections, command_timeout
    if isinstance(error, asyncpg.PostgresError | asyncpg.InterfaceError):
        sqlstate = getattr(error, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_UNAVAILABLE_SQLSTATE_PREFIXES):
            return True
        return isinstance(error, asyncpg.InterfaceError | asyncpg.ConnectionDoesNotExistError)
    if isinstance(error, exc.DBAPIError):
        if error.connection_invalidated:
            return True
        orig = error.orig
        sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_UNAVAILABLE_SQLSTATE_PREFIXES):
            return True
        cause = getattr(orig, "__cause__", None)
        if cause is not None and cause is not error:
            return is_unavailable_error(cause)
        return isinstance(error, exc.InterfaceError)
    return isinstance(error, OSError)


class DatabaseObserver(Protocol):
    """What the telemetry layer wants to know about the pool (implemented by AppMetrics)."""

    def connection_acquired(self, seconds: float) -> None: ...
    def pool_checked_out(self, count: int) -> None: ...
    def database_unavailable(self) -> None: ...


class Database:
    """Owns the engine; hands out one connection with one transaction per unit of work."""

    def __init__(
        self,
        engine: AsyncEngine,
        observer: DatabaseObserver | None = None,
        *,
        pooler: str = "none",
    ) -> None:
        self.engine = engine
        self._observer = observer
        self._pooler = pooler

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Session]:
        """One connection, one transaction: committed when the block ends, rolled back on any
        error. An unreachable database becomes DatabaseUnavailable."""
        async with self._session(transactional=True) as session:
            yield session

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Session]:
        """For a unit of work that is a single read statement: no BEGIN/COMMIT round trips
        where the path allows (direct, or PgBouncer >= 1.21 which keeps prepared statements
        across server connections). Older PgBouncer needs the transaction to pin one server
        connection between Parse and Execute."""
        transactional = (
            self.engine.dialect.name != "postgresql" or self._pooler == "pgbouncer-legacy"
        )
        async with self._session(transactional=transactional) as session:
            yield session

    @asynccontextmanager
    async def stream(self) -> AsyncIterator[Session]:
        """For a long read that streams to a client (exports). If it ends early (client gone,
        error) the connection is closed instead of reused: that stops the query on the server
        at once, and a connection in the middle of a COPY is never handed to anyone else."""
        async with self._session(transactional=True, discard_on_error=True) as session:
            yield session

    @asynccontextmanager
    async def _session(
        self, *, transactional: bool, discard_on_error: bool = False
    ) -> AsyncIterator[Session]:
        started = time.perf_counter()
        try:
            async with self.engine.connect() as connection:
                if self._observer is not None:
                    self._observer.connection_acquired(time.perf_counter() - started)
                if connection.dialect.name != "postgresql":
                    async with connection.begin():
                        yield SqlAlchemySession(connection)
                    return
                raw: Any = (await connection.get_raw_connection()).driver_connection
                try:
                    if transactional:
                        async with raw.transaction():
                            yield PostgresSession(raw)
                    else:
                        yield PostgresSession(raw)
                except BaseException as error:
                    if discard_on_error or is_unavailable_error(error):
                        # The pool cannot see errors on the driver connection: drop this one.
                        await connection.invalidate()
                    raise
        except DatabaseUnavailable:
            raise
        except Exception as error:
            if is_unavailable_error(error):
                log.warning("database unavailable: %s", _one_line(error))
                if self._observer is not None:
                    self._observer.database_unavailable()
                raise DatabaseUnavailable(_one_line(error)) from error
            raise

    def report_pool_usage(self) -> None:
        """Report the pool's checked-out count (the app samples it every second). Read from
        the pool rather than counted from checkout/checkin events: those drifted (a gauge
        left at 2 at rest) and cost a metrics write on every checkout."""
        if self._observer is not None:
            self._observer.pool_checked_out(self.engine.sync_engine.pool.checkedout())  # type: ignore[attr-defined]

    async def dispose(self) -> None:
        await self.engine.dispose()


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]
