"""Driver errors that leave a connection in an unknown state: classified as "unavailable"
(503 + Retry-After), the connection closed rather than reused, and the client told whether
its write may have been stored."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from app.config import Settings
from app.db.engine import Database, create_engine
from app.db.errors import DatabaseUnavailable, is_unavailable_error
from harness.processes import free_port
from tests.support.app import changed

pytestmark = pytest.mark.postgres

# What asyncpg raised when PgBouncer's "server conn crashed?" arrived while a transaction
# was idle before COMMIT (seen under kill -9 of PostgreSQL).
STATE_ERROR = "cannot switch to state 15; another operation (2) is in progress"


def test_internal_client_error_means_unavailable() -> None:
    assert is_unavailable_error(asyncpg.InternalClientError(STATE_ERROR))
    assert not is_unavailable_error(asyncpg.UniqueViolationError("duplicate key"))


def test_a_standby_and_no_primary_mean_unavailable() -> None:
    """After a failover: a write on a connection to the demoted primary (25006), or no host
    of a multi-host DSN accepting writes."""
    standby = asyncpg.ReadOnlySQLTransactionError(
        "cannot execute INSERT in a read-only transaction"
    )
    assert is_unavailable_error(standby)
    assert is_unavailable_error(asyncpg.TargetServerAttributeNotMatched("none is read-write"))
    assert not is_unavailable_error(asyncpg.ReadOnlySQLTransactionError.__mro__[1]("other 25"))


@pytest.mark.parametrize("backend", ["postgres"])
async def test_driver_state_error_discards_the_connection(settings: Settings) -> None:
    db = Database(create_engine(settings.db), request_timeout=5)
    seen: list[Any] = []

    async def fails_mid_transaction() -> None:
        async with db.transaction() as session:
            await session.scalar("one", _select_one, {})
            seen.append(session._conn)  # type: ignore[attr-defined]
            raise asyncpg.InternalClientError(STATE_ERROR)

    try:
        with pytest.raises(DatabaseUnavailable) as raised:
            await fails_mid_transaction()
        assert raised.value.outcome == "not-applied"  # before COMMIT: nothing was stored
        assert seen[0].is_closed(), "a connection in an unknown state went back to the pool"
        async with db.read() as session:  # the next unit of work gets a fresh one
            assert await session.scalar("one", _select_one, {}) == 1
    finally:
        await db.dispose()


@pytest.mark.parametrize("backend", ["postgres"])
async def test_connection_lost_at_commit_leaves_the_outcome_unknown(settings: Settings) -> None:
    async def loses_connection_before_commit(db: Database) -> None:
        async with db.transaction() as session:
            await session.scalar("one", _select_one, {})
            session._conn.terminate()  # type: ignore[attr-defined]

    assert await _outcome(settings, loses_connection_before_commit) == "unknown"


@pytest.mark.parametrize("backend", ["postgres"])
async def test_a_single_write_is_in_doubt_only_once_it_may_have_reached_the_server(
    settings: Settings,
) -> None:
    """write_one() (one autocommit statement, no COMMIT to wait for): a failure before a
    connection is held reports "not-applied" (safe to retry); one after, "unknown"."""
    nowhere = changed(settings, database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/none")

    async def cannot_connect(db: Database) -> None:
        async with db.write_one() as session:
            await session.scalar("one", _select_one, {})

    async def loses_connection_between_statements(db: Database) -> None:
        async with db.write_one() as session:
            await session.scalar("one", _select_one, {})
            session._conn.terminate()  # type: ignore[attr-defined]
            await session.scalar("one", _select_one, {})

    assert await _outcome(nowhere, cannot_connect) == "not-applied"
    assert await _outcome(settings, loses_connection_between_statements) == "unknown"


async def _outcome(settings: Settings, work: Callable[[Database], Awaitable[None]]) -> str:
    """The outcome the DatabaseUnavailable raised by `work` reports."""
    db = Database(create_engine(settings.db), request_timeout=5)
    try:
        with pytest.raises(DatabaseUnavailable) as raised:
            await work(db)
    finally:
        await db.dispose()
    return raised.value.outcome


def _select_one(dialect: str) -> Any:
    from sqlalchemy import literal, select

    return select(literal(1))


@pytest.mark.parametrize("backend", ["postgres"])
async def test_several_units_and_the_waits_between_them_share_one_bound(
    settings: Settings,
) -> None:
    """A page that takes a window query, a turn at the expensive-query gate and another
    query ends at DB_REQUEST_TIMEOUT as a whole (each unit alone was bounded, not the sum)."""
    import asyncio
    import time

    db = Database(create_engine(settings.db), request_timeout=0.3)
    try:

        async def two_queries_and_a_wait() -> None:
            async with db.one_bound():
                async with db.read() as session:
                    await session.scalar("sleep", _sleep_briefly, {})
                await asyncio.sleep(0.05)  # waiting for a turn at the gate
                async with db.read() as session:
                    await session.scalar("sleep", _sleep_briefly, {})

        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable, match=r"within 0\.3s"):
            await two_queries_and_a_wait()
        assert time.monotonic() - started < 0.45
        async with db.one_bound(), db.read() as session:  # within the bound: as before
            assert await session.scalar("one", _select_one, {}) == 1
    finally:
        await db.dispose()


def _sleep_briefly(dialect: str) -> Any:
    from sqlalchemy import func, select

    return select(func.pg_sleep(0.2))
