"""PostgreSQL connections: asyncpg's own pool, with the two things a pooler in front needs.

- No reset round trip on release. asyncpg's default release runs `RESET ALL; CLOSE ALL; ...`
  (one more round trip per unit of work, which PgBouncer's transaction mode makes pointless:
  the next transaction may land on another server connection anyway). A transaction left
  open is still rolled back, and a connection in doubt is closed by the caller.
- A maximum age. A connection older than `recycle_seconds` is closed when released, and one
  idle that long is closed by the pool. That is what lets a PgBouncer >= 1.23, which on
  SIGTERM waits for its clients to leave, go away during a rolling restart without one
  failed request; it also spreads clients over new pooler pods after a scale-out.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
from sqlalchemy.engine import URL

CLOSE_TIMEOUT_SECONDS = 5.0


class _Connection(asyncpg.Connection):  # type: ignore[misc]
    __slots__ = ("born",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.born = time.monotonic()


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Release hook: nothing to reset (asyncpg has already rolled back an open transaction)."""


def connect_kwargs(url: URL) -> dict[str, Any]:
    """asyncpg.connect() arguments from a SQLAlchemy URL (its query, e.g. ?ssl=require,
    passes through)."""
    kwargs: dict[str, Any] = url.translate_connect_args(username="user", database="database")
    kwargs.update(dict(url.query))
    return kwargs


class PostgresPool:
    """Created idle (no connection is opened until the first unit of work)."""

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
        self._lock = asyncio.Lock()

    async def _started(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        min_size=0,
                        max_size=self._max_size,
                        max_inactive_connection_lifetime=self._recycle or 0,
                        reset=_keep_session,
                        connection_class=_Connection,
                        **self._kwargs,
                    )
        return self._pool

    async def acquire(self) -> Any:
        """A connection, waiting at most `acquire_timeout` for one (then TimeoutError)."""
        pool = await self._started()
        # Bounded here, not with acquire(timeout=): asyncpg's timeout runs the wait in a task
        # of its own (asyncio.wait_for), one more task and loop turn per unit of work.
        async with asyncio.timeout(self._acquire_timeout):
            return await pool.acquire()

    async def release(self, connection: Any, *, discard: bool = False) -> None:
        """Give a connection back; `discard` (or old age) closes it instead of reusing it."""
        if discard or (
            self._recycle is not None and time.monotonic() - connection.born > self._recycle
        ):
            # terminate(): a graceful close would wait on a connection mid-statement.
            connection.terminate()
        assert self._pool is not None
        await self._pool.release(connection)

    def checked_out(self) -> int:
        if self._pool is None:
            return 0
        return int(self._pool.get_size() - self._pool.get_idle_size())

    async def close(self) -> None:
        """Close gracefully; connections still checked out after a few seconds are cut."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_SECONDS)
            except TimeoutError:
                pool.terminate()
