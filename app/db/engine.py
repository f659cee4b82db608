"""The connection pool for each way of reaching the database, and the one transaction scope
the rest of the app uses."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Any, Protocol

from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from app.config import DatabaseSettings
from app.db.errors import (
    DatabaseUnavailable,
    Outcome,
    SchemaNotReady,
    is_missing_table,
    is_retryable_first_round_trip,
    is_unavailable_error,
    one_line,
)
from app.db.pool import AsyncpgPool, PostgresPool
from app.db.session import PostgresSession, Session, SqlAlchemySession

log = logging.getLogger(__name__)


def postgres_connect_args(db: DatabaseSettings) -> dict[str, Any]:
    args: dict[str, Any] = {
        "timeout": db.connect_timeout,
        # Client-side guard that also sends a cancel request; unlike a `statement_timeout`
        # startup parameter it passes through every PgBouncer version.
        "command_timeout": db.statement_timeout,
        "server_settings": {"application_name": "itemstream"},
    }
    if db.pooler == "none":
        timeout_ms = int(db.statement_timeout * 1000)
        args["server_settings"]["statement_timeout"] = str(timeout_ms)
    elif db.pooler == "pgbouncer-legacy":
        # No named statements (asyncpg >= 0.31 sends every statement unnamed with its cache
        # off): PgBouncer < 1.21 hands each transaction a different server connection.
        args["statement_cache_size"] = 0
    return args


Pool = PostgresPool | AsyncpgPool
Backend = AsyncEngine | Pool


def create_engine(
    db: DatabaseSettings, url: URL | None = None, *, pool_size: int | None = None
) -> Backend:
    """Create the app's connection pool: SQLAlchemy's engine for SQLite; for PostgreSQL the
    worker's own pool of asyncpg connections (app/db/pool.py), or asyncpg's pool with
    DB_POOL_IMPL=asyncpg. Call once per process, after any fork. `pool_size` gives a small
    pool of its own (no overflow), e.g. for the readiness probe."""
    url = url or db.app_url
    if url.get_backend_name() == "sqlite":
        return sqlite_engine(url)
    pool = AsyncpgPool if db.pool_impl == "asyncpg" else PostgresPool
    return pool(
        url,
        postgres_connect_args(db),
        max_size=pool_size or db.pool_size + db.max_overflow,
        acquire_timeout=db.pool_timeout,
        recycle_seconds=db.pool_recycle,
    )


def sqlite_engine(url: URL, **kwargs: Any) -> AsyncEngine:
    """An engine for the embedded SQLite database, every connection configured alike (the
    app's and the migrations', so the file is in WAL mode before the app opens it)."""
    engine = create_async_engine(url, connect_args={"timeout": 15}, **kwargs)
    event.listen(engine.sync_engine, "connect", _configure_sqlite)
    return engine


def _configure_sqlite(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=15000")
    # WAL is a property of the file: switch only when it is not in WAL yet. Switching needs an
    # exclusive lock and gives "database is locked" at once (no busy wait) when another
    # connection opens the file at the same moment, as the app's pool and its readiness
    # probe do at start.
    cursor.execute("PRAGMA journal_mode")
    row = cursor.fetchone()
    if row is None or str(row[0]).lower() != "wal":
        cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()
    # SQLite's lower() folds ASCII only; ILIKE compiles to lower(x) LIKE lower(y), so give it
    # Unicode case folding to match PostgreSQL.
    raw = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    raw = getattr(raw, "_conn", raw)  # aiosqlite wraps the sqlite3 connection
    if isinstance(raw, sqlite3.Connection):
        raw.create_function("lower", 1, _unicode_lower, deterministic=True)


def _unicode_lower(value: str | None) -> str | None:
    return value.lower() if isinstance(value, str) else value


class DatabaseObserver(Protocol):
    """What the telemetry layer wants to know about the pool (implemented by AppMetrics)."""

    def connection_acquired(self, seconds: float) -> None: ...
    def pool_checked_out(self, count: int) -> None: ...
    def database_unavailable(self) -> None: ...


class Database:
    """Owns the pool; hands out one connection with one transaction per unit of work.

    Every unit of work is bounded by `request_timeout` as a whole: pool checkout, connect,
    the wait in PgBouncer's queue for a server (which no connect timeout covers: PgBouncer
    accepts at once), every statement and the commit. Past it the connection is discarded and
    the caller gets DatabaseUnavailable. A connection found dead on its first round trip
    (e.g. left behind by a PgBouncer that restarted) is replaced once: nothing reached the
    database on it, so any unit of work may be retried."""

    def __init__(
        self,
        backend: Backend,
        observer: DatabaseObserver | None = None,
        *,
        pooler: str = "none",
        request_timeout: float | None = None,
    ) -> None:
        self.backend = backend
        self._observer = observer
        self._pooler = pooler
        self._request_timeout = request_timeout
        # When this process last found the database unavailable (time.monotonic()), on any
        # path: a request, a probe, a checkpoint, a sweep.
        self.unavailable_at = -float("inf")
        # Whether a one-statement unit of work still needs BEGIN/COMMIT: older PgBouncer needs a
        # transaction to pin one server connection between Parse and Execute; SQLite's engine
        # always opens one.
        self._needs_begin = isinstance(backend, AsyncEngine) or pooler == "pgbouncer-legacy"

    @property
    def dialect(self) -> str:
        return "sqlite" if isinstance(self.backend, AsyncEngine) else "postgresql"

    def transaction(self) -> AbstractAsyncContextManager[Session]:
        """One connection, one transaction: committed when the block ends, rolled back on any
        error. An unreachable database becomes DatabaseUnavailable."""
        return self._session(transactional=True)

    def read(self) -> AbstractAsyncContextManager[Session]:
        """For a unit of work that is a single read statement: no BEGIN/COMMIT round trips
        where the path allows (direct, or PgBouncer >= 1.21 which keeps prepared statements
        across server connections)."""
        return self._session(transactional=self._needs_begin)

    def write_one(self) -> AbstractAsyncContextManager[Session]:
        """For a unit of work whose only write is a single statement (atomic by itself),
        possibly followed by reads (under READ COMMITTED a transaction would give them no
        other snapshot): as read(), no BEGIN/COMMIT round trips where the path allows. A
        failure once the connection is held may come after the write was applied, so it is
        reported as in doubt; one before (no connection) as not applied."""
        return self._session(transactional=self._needs_begin, in_doubt=True)

    def stream(self) -> AbstractAsyncContextManager[Session]:
        """For a long read that streams to a client (exports; bounded by its own limit, not
        the request timeout). If it ends early (client gone, error) the connection is closed
        instead of reused: that stops the query on the server at once, and a connection in
        the middle of a COPY is never handed to anyone else."""
        return self._session(transactional=True, discard_on_error=True, bounded=False)

    @asynccontextmanager
    async def one_bound(self) -> AsyncIterator[None]:
        """The units of work in the block, and every wait between them (an expensive query's
        turn at the gate), end within one `request_timeout` as a whole: a request that runs
        several answers 503 at the bound, like one that runs one."""
        limit = self._request_timeout
        if limit is None:
            yield
            return
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                yield
        except TimeoutError as error:
            if not deadline.expired():
                raise
            raise self._explained(error, limit, "not-applied") or error from None

    @asynccontextmanager
    async def _session(
        self,
        *,
        transactional: bool,
        discard_on_error: bool = False,
        bounded: bool = True,
        in_doubt: bool = False,
    ) -> AsyncIterator[Session]:
        # One generator for the whole unit of work (it runs on every request: each nested
        # context manager would cost a generator and two more awaits).
        limit = self._request_timeout if bounded else None
        deadline: AbstractAsyncContextManager[Any] = (
            asyncio.timeout(limit) if limit is not None else nullcontext()
        )
        outcome: Outcome = "not-applied"
        try:
            async with deadline:
                started = time.perf_counter()
                if isinstance(self.backend, AsyncEngine):
                    async with self.backend.begin() as connection:
                        self._acquired(started)
                        yield SqlAlchemySession(connection)
                    return
                held = _Held(self.backend, await self.backend.acquire())
                self._acquired(started)
                discard = False
                try:
                    if held.raw.is_closed():  # the peer closed it while pooled (free to check)
                        await held.replace()
                    if not transactional:
                        if in_doubt:
                            outcome = "unknown"  # the statement may reach the server from here
                        yield PostgresSession(held.raw, replace=held.replace)
                        return
                    transaction = await _begin(held)
                    try:
                        yield PostgresSession(held.raw)
                    except BaseException as error:
                        if not _in_doubt(error):  # else the connection is closed: rolls back
                            await transaction.rollback()
                        raise
                    outcome = "unknown"  # from here an error leaves the write in doubt
                    await transaction.commit()
                except BaseException as error:
                    # A connection in an unknown state (broken, timed out or cancelled
                    # mid-statement) is closed, never handed to the next request.
                    discard = discard_on_error or _in_doubt(error)
                    raise
                finally:
                    pending = held.release(discard=discard)
                    if pending is not None:  # asyncpg's pool gives back asynchronously
                        await pending
        except Exception as error:
            explained = self._explained(error, limit, outcome)
            if explained is None:
                raise
            raise explained from error

    def _explained(
        self, error: Exception, limit: float | None, outcome: Outcome
    ) -> Exception | None:
        """The domain error a driver or pool failure means, if any."""
        if isinstance(error, DatabaseUnavailable):
            return None
        if isinstance(error, TimeoutError):
            self._unavailable(error)
            return DatabaseUnavailable(
                f"no answer from the database within {limit}s", outcome=outcome
            )
        if is_unavailable_error(error):
            self._unavailable(error)
            return DatabaseUnavailable(one_line(error), outcome=outcome)
        if is_missing_table(error):
            self._schema_missing(error)
            return SchemaNotReady("the database schema is not migrated; run `itemstream migrate`")
        return None

    def _schema_missing(self, error: BaseException) -> None:
        # Once a minute per process at most: every request fails the same way until the
        # migration runs.
        now = time.monotonic()
        if now - _schema_warning["at"] > 60:
            _schema_warning["at"] = now
            log.warning(
                "database schema not migrated (%s): requests get 503 until `itemstream "
                "migrate` runs (see /readyz for the pending revision)",
                one_line(error),
            )

    def _unavailable(self, error: BaseException) -> None:
        self.unavailable_at = time.monotonic()
        log.warning("database unavailable: %s", one_line(error))
        if self._observer is not None:
            self._observer.database_unavailable()

    def _acquired(self, started: float) -> None:
        if self._observer is not None:
            self._observer.connection_acquired(time.perf_counter() - started)

    def report_pool_usage(self) -> None:
        """Report the pool's checked-out count (the app samples it every second)."""
        if self._observer is not None:
            if isinstance(self.backend, AsyncEngine):
                count = self.backend.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
            else:
                count = self.backend.checked_out()
            self._observer.pool_checked_out(count)

    async def dispose(self) -> None:
        if isinstance(self.backend, AsyncEngine):
            await self.backend.dispose()
        else:
            await self.backend.close()


_schema_warning = {"at": -3600.0}


def _in_doubt(error: BaseException) -> bool:
    """The connection's protocol state is unknown after this error."""
    return isinstance(error, asyncio.CancelledError) or is_unavailable_error(error)


class _Held:
    """The connection a unit of work runs on, and how to give it back or replace it."""

    __slots__ = ("pool", "raw")

    def __init__(self, pool: Pool, raw: Any) -> None:
        self.pool = pool
        self.raw = raw

    def release(self, *, discard: bool) -> Awaitable[None] | None:
        return self.pool.release(self.raw, discard=discard)

    async def replace(self) -> Any:
        """Close this connection and take a fresh one in its place."""
        pending = self.pool.release(self.raw, discard=True)
        if pending is not None:
            await pending
        self.raw = await self.pool.acquire()
        return self.raw


async def _begin(held: _Held) -> Any:
    """BEGIN, the first round trip of a transaction. On a dead connection nothing was done,
    so it is retried once on a fresh one."""
    transaction = held.raw.transaction()
    try:
        await transaction.start()
    except Exception as error:
        if not is_retryable_first_round_trip(error):
            raise
        log.info("pooled connection was dead (%s); retrying on a fresh one", one_line(error))
        transaction = (await held.replace()).transaction()
        await transaction.start()
    return transaction
