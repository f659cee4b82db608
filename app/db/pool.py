"""PostgreSQL connections for one worker: a small pool of asyncpg connections, made for a
pooler in front and for a checkout on every request.

- No reset round trip on release (asyncpg's pool runs `RESET ALL; CLOSE ALL; ...`, one more
  round trip per unit of work, which PgBouncer's transaction mode makes pointless: the next
  transaction may land on another server connection anyway). A connection released inside a
  transaction, or in doubt (the caller says so), is closed instead of reused.
- A maximum age. A connection older than `recycle_seconds` is closed when released, and an
  idle one is closed by a sweep at a quarter of that age. That is what lets a PgBouncer
  >= 1.23, which on SIGTERM waits for its clients to leave, go away during a rolling restart
  without one failed request; it also spreads clients over new pooler pods after a scale-out.
- Fair under contention: a released connection goes to the longest waiter, never to a request
  that arrives later; when a released connection is closed instead (discarded, or too old) the
  slot is reserved for that waiter; idle connections are reused most recent first (warm, and
  the rest age out).
- A statement cancelled in flight (a request timeout, a client that left) is stopped on the
  server before its connection is cut. asyncpg sends PostgreSQL a cancel request from a
  background task when a query's wait is cancelled, and `terminate()` cancels that task:
  closing at once left the query running in PostgreSQL (reproduced: `pg_sleep` still active
  a second after a 0.5 s DB_REQUEST_TIMEOUT; a closed socket does not stop a query that sends
  nothing). A discarded connection whose cancel request is in progress keeps its slot until
  PostgreSQL acknowledged the cancellation (at most CANCEL_TIMEOUT_SECONDS), then is closed.
  This reads asyncpg's protocol state through the two private methods its own pool uses for
  the same purpose on release (`_is_cancelling`, `_wait_for_cancellation`).
- Cheap: a checkout is a list pop when a connection is idle (asyncpg's pool also wraps each
  connection in a proxy and re-arms an idle timer on every release).

Why not asyncpg's own pool (`DB_POOL_IMPL=asyncpg`, AsyncpgPool below, with a no-op reset
and the same recycling): `make bench` side by side in one run (2026-12-04, 2 workers, 64
connections, PgBouncer 1.24): get by id 2,581 against 2,318 requests/s (asyncpg's 10 % slower),
create 1,820 against 1,702, patch 1,618 against 1,510, list 1,276 against 1,211, search even;
and it lets a late arrival overtake a waiter (asyncio.Queue). Its rules are
proven by tests/properties/test_pool.py (random interleavings of acquire, release,
discard, cancellation at every step, ageing, sweeps, failing connects and close, against fake
connections) and tests/test_pool.py (each rule on a real server).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import asyncpg
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.engine import URL

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_SECONDS = 5.0
CANCEL_TIMEOUT_SECONDS = 5.0


_ASYNCPG_DIALECT = PGDialect_asyncpg()  # type: ignore[no-untyped-call]


class _Connection(asyncpg.Connection):  # type: ignore[misc]
    __slots__ = ("born",)  # when the pool opened it (its clock)


def connect_kwargs(url: URL) -> dict[str, Any]:
    """asyncpg.connect() arguments from a SQLAlchemy URL, made by SQLAlchemy's asyncpg dialect
    as the migrations' engine makes them: the query passes through (?ssl=require), and several
    hosts (?host=a:5432&host=b:5432, with target_session_attrs=read-write to find the primary)
    become asyncpg's host and port lists."""
    _, kwargs = _ASYNCPG_DIALECT.create_connect_args(url)  # type: ignore[no-untyped-call]
    return dict(kwargs)


class PostgresPool:
    """Created idle: no connection is opened until the first unit of work. Connections in use
    are the caller's; `release` gives each back exactly once."""

    def __init__(
        self,
        url: URL,
        connect_args: dict[str, Any],
        *,
        max_size: int,
        acquire_timeout: float,
        recycle_seconds: float,
        connect: Callable[..., Awaitable[Any]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._kwargs = {**connect_kwargs(url), **connect_args}
        # asyncpg.connect, or a stand-in (the property tests' fake connections).
        self._connect = connect or partial(asyncpg.connect, connection_class=_Connection)
        self._clock = clock
        self._max_size = max_size
        self._acquire_timeout = acquire_timeout
        self._recycle = recycle_seconds if recycle_seconds > 0 else None
        self._idle: list[_Connection] = []  # most recently released last
        self._in_use: set[_Connection] = set()
        self._opening = 0
        # Slots handed to waiters as "open one" that they have not taken up yet: counted, so
        # that a later arrival cannot take the slot first (which sent the waiter back to the
        # end of the queue: the FIFO promise broken whenever a released connection was closed).
        self._reserved = 0
        # Each gets a connection, or None: a slot is free, open one.
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._sweeper: asyncio.Task[None] | None = None
        # Discarded while PostgreSQL cancels their statement: still a server connection each.
        self._cancelling: dict[_Connection, asyncio.Task[None]] = {}
        self._closed = False
        self._drained: asyncio.Event | None = None  # set at close once nothing is in use

    @property
    def _size(self) -> int:
        return (
            len(self._idle)
            + len(self._in_use)
            + self._opening
            + self._reserved
            + len(self._cancelling)
        )

    async def acquire(self) -> Any:
        """A connection, waiting at most `acquire_timeout` for one (then TimeoutError)."""
        if self._closed:
            raise asyncpg.InterfaceError("the connection pool is closed")
        if self._recycle is not None and self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(self._recycle))
        connection = self._take_idle()  # the common case: no timer, no await
        if connection is not None:
            return connection
        async with asyncio.timeout(self._acquire_timeout):
            return await self._wait_or_open()

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if self._fresh(connection):
                self._in_use.add(connection)
                return connection
            self._close(connection)
        return None

    async def _wait_or_open(self) -> _Connection:
        connection = self._take_idle()
        if connection is not None:
            return connection
        if self._size < self._max_size:
            return await self._open()
        waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            handed = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Handed a connection (counted in use for us) or a reserved slot just as the
                # wait ended (a timeout, a cancellation in the same tick): pass it on whole.
                self._give_back(waiter.result())
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise
        if handed is not None:
            return handed  # already counted in use by whoever released it
        return await self._open(reserved=True)

    def _give_back(self, handed: _Connection | None) -> None:
        if handed is None:
            self._reserved -= 1
            self._hand_on(None)
            return
        self._in_use.discard(handed)
        self._hand_on(handed)

    async def _open(self, *, reserved: bool = False) -> _Connection:
        if reserved:
            self._reserved -= 1
        if self._closed:
            self._hand_on(None)
            raise asyncpg.InterfaceError("the connection pool is closed")
        self._opening += 1
        try:
            connection: _Connection = await self._connect(**self._kwargs)
        except BaseException:
            self._opening -= 1
            self._hand_on(None)  # the slot is free again
            raise
        self._opening -= 1
        connection.born = self._clock()
        self._in_use.add(connection)
        return connection

    def release(self, connection: Any, *, discard: bool = False) -> None:
        """Give a connection back; `discard` (or old age, or an open transaction) closes it
        instead of reusing it. A connection the pool does not count in use is ignored (given
        back twice, or cut at close)."""
        if connection not in self._in_use:
            return
        self._in_use.discard(connection)
        if self._drained is not None and not self._in_use:
            self._drained.set()
        if discard or self._closed or not self._fresh(connection) or connection.is_in_transaction():
            if _cancelling(connection):
                self._cancelling[connection] = asyncio.create_task(
                    self._close_when_cancelled(connection)
                )
                return
            self._close(connection)
            self._hand_on(None)
            return
        self._hand_on(connection)

    async def _close_when_cancelled(self, connection: _Connection) -> None:
        try:
            await connection._protocol._wait_for_cancellation(CANCEL_TIMEOUT_SECONDS)
        except (Exception, asyncio.CancelledError):  # noqa: S110 - closed below either way
            pass
        finally:
            self._close(connection)
            if self._cancelling.pop(connection, None) is not None:
                self._hand_on(None)

    def _hand_on(self, connection: _Connection | None) -> None:
        """To the longest waiter if any: a connection (counted in use from here), or None for
        a free slot (reserved for it from here)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                if connection is not None:
                    self._in_use.add(connection)
                else:
                    self._reserved += 1
                waiter.set_result(connection)
                return
        if connection is not None:
            if self._closed:
                self._close(connection)
            else:
                self._idle.append(connection)

    def _fresh(self, connection: _Connection) -> bool:
        if connection.is_closed():
            return False
        return self._recycle is None or self._clock() - connection.born <= self._recycle

    @staticmethod
    def _close(connection: _Connection) -> None:
        # terminate(): a graceful close would wait on a connection mid-statement.
        connection.terminate()

    async def _sweep_forever(self, recycle: float) -> None:
        interval = max(recycle / 4, 0.25)
        while True:
            await asyncio.sleep(interval)
            self.sweep()

    def sweep(self) -> None:
        """Close the idle connections past their age."""
        keep: list[_Connection] = []
        for connection in self._idle:
            if self._fresh(connection):
                keep.append(connection)
            else:
                self._close(connection)
        self._idle = keep

    def checked_out(self) -> int:
        return len(self._in_use) + self._opening + self._reserved + len(self._cancelling)

    async def close(self) -> None:
        """Close gracefully; connections still checked out after a few seconds are cut."""
        if self._closed:
            return
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(asyncpg.InterfaceError("the connection pool is closed"))
        self._waiters.clear()
        idle, self._idle = self._idle, []
        deadline = time.monotonic() + CLOSE_TIMEOUT_SECONDS  # for the whole close
        self._drained = asyncio.Event()
        if not self._in_use:
            self._drained.set()
        try:
            await asyncio.wait_for(
                asyncio.gather(*(c.close() for c in idle), return_exceptions=True),
                CLOSE_TIMEOUT_SECONDS,
            )
        except TimeoutError:
            for connection in idle:
                connection.terminate()
        with contextlib.suppress(TimeoutError):  # units of work finishing; release() closes theirs
            await asyncio.wait_for(self._drained.wait(), max(deadline - time.monotonic(), 0))
        for connection in list(self._in_use):
            log.warning("closing a database connection still in use at shutdown")
            connection.terminate()
        self._in_use.clear()
        if self._cancelling:  # cancel requests in progress: let them land, within the deadline
            await asyncio.wait(
                list(self._cancelling.values()), timeout=max(deadline - time.monotonic(), 0)
            )
            for connection, task in list(self._cancelling.items()):
                task.cancel()
                connection.terminate()
            self._cancelling.clear()


def _cancelling(connection: Any) -> bool:
    """Whether asyncpg is cancelling the connection's statement in flight (a cancel request
    sent or about to be, not yet acknowledged): its pool checks the same before reusing."""
    protocol = getattr(connection, "_protocol", None)
    return protocol is not None and bool(protocol._is_cancelling())


async def _no_reset(connection: Any) -> None:
    """asyncpg's pool runs `RESET ALL; CLOSE ALL; UNLISTEN *; ...` on every release: a round
    trip per unit of work that PgBouncer's transaction mode makes pointless."""


class AsyncpgPool:
    """asyncpg's own pool (`asyncpg.create_pool`), as the library gives it, with a no-op reset
    and the recycling rule of PostgresPool applied on release: `DB_POOL_IMPL=asyncpg`, kept so
    that `make bench` measures the two side by side (docs/benchmarks.md). Its waiters are not
    served in arrival order (asyncio.Queue lets a late arrival take a connection put back
    before a woken waiter runs)."""

    def __init__(
        self,
        url: URL,
        connect_args: dict[str, Any],
        *,
        max_size: int,
        acquire_timeout: float,
        recycle_seconds: float,
    ) -> None:
        self.url = url
        self._kwargs = {**connect_kwargs(url), **connect_args}
        self._max_size = max_size
        self._acquire_timeout = acquire_timeout
        self._recycle = recycle_seconds if recycle_seconds > 0 else None
        self._pool: asyncpg.Pool | None = None
        self._creating: asyncio.Lock | None = None
        self._born: dict[int, float] = {}
        self._closed = False

    async def _get(self) -> asyncpg.Pool:
        if self._pool is None:
            self._creating = self._creating or asyncio.Lock()
            async with self._creating:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        min_size=0,
                        max_size=self._max_size,
                        reset=_no_reset,
                        max_inactive_connection_lifetime=self._recycle or 0,
                        **self._kwargs,
                    )
        return self._pool

    async def acquire(self) -> Any:
        if self._closed:
            raise asyncpg.InterfaceError("the connection pool is closed")
        pool = await self._get()
        connection = await pool.acquire(timeout=self._acquire_timeout)
        self._born.setdefault(id(connection._con), time.monotonic())
        return connection

    def release(self, connection: Any, *, discard: bool = False) -> Awaitable[None] | None:
        raw = connection._con
        born = self._born.get(id(raw), 0.0)
        old = self._recycle is not None and time.monotonic() - born > self._recycle
        assert self._pool is not None
        if discard or old or connection.is_in_transaction():
            self._born.pop(id(raw), None)
            return self._terminate(connection)
        release: Awaitable[None] = self._pool.release(connection)
        return release

    async def _terminate(self, connection: Any) -> None:
        """Close, once a cancellation in progress has reached the server (terminate() would
        cancel asyncpg's cancel request); the pool opens a fresh one in its place."""
        if _cancelling(connection._con):
            with contextlib.suppress(Exception):
                await connection._con._protocol._wait_for_cancellation(CANCEL_TIMEOUT_SECONDS)
        connection.terminate()
        assert self._pool is not None
        await self._pool.release(connection)

    def sweep(self) -> None:
        """asyncpg closes idle connections itself (max_inactive_connection_lifetime)."""

    def checked_out(self) -> int:
        if self._pool is None:
            return 0
        size: int = self._pool.get_size() - self._pool.get_idle_size()
        return size

    async def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), CLOSE_TIMEOUT_SECONDS)
            except TimeoutError:
                self._pool.terminate()
