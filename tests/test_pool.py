"""The worker's PostgreSQL pool (app.db.pool) on a real server: its rules, one by one.

Bounded size, FIFO hand-over to waiters (a late arrival never overtakes), a bounded wait, a
discarded or failed connection frees its slot, old connections are replaced (on release and
by the idle sweep), an open transaction is never reused, and close() cuts what is left."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from app.db.pool import PostgresPool
from harness.postgres import PostgresServer
from harness.processes import free_port

pytestmark = pytest.mark.postgres


def _pool(
    pg: PostgresServer, *, size: int = 2, timeout: float = 2, recycle: float = 60
) -> PostgresPool:
    url = make_url(f"postgresql://postgres@127.0.0.1:{pg.port}/postgres")
    return PostgresPool(
        url, {"timeout": 5}, max_size=size, acquire_timeout=timeout, recycle_seconds=recycle
    )


async def test_size_bound_fifo_hand_over_and_bounded_wait(pg: PostgresServer) -> None:
    pool = _pool(pg, size=2, timeout=0.5)
    try:
        first, second = await pool.acquire(), await pool.acquire()
        assert pool.checked_out() == 2
        order: list[str] = []

        async def waiter(name: str) -> None:
            connection = await pool.acquire()
            order.append(name)
            await asyncio.sleep(0.01)
            pool.release(connection)

        early = asyncio.create_task(waiter("early"))
        await asyncio.sleep(0.05)
        late = asyncio.create_task(waiter("late"))
        await asyncio.sleep(0.05)
        pool.release(first)  # goes to "early", then "early" hands it to "late"
        await asyncio.wait_for(asyncio.gather(early, late), 2)
        assert order == ["early", "late"]

        taken = await pool.acquire()  # one idle, one held: take the idle one...
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await pool.acquire()  # ...and the pool is exhausted
        assert 0.4 < time.monotonic() - started < 1.5
        pool.release(taken)
    finally:
        await pool.close()
    assert second.is_closed()  # still checked out at close: cut


async def test_discarded_and_failed_connections_free_their_slot(pg: PostgresServer) -> None:
    pool = _pool(pg, size=1, timeout=2)
    try:
        connection = await pool.acquire()
        waiting = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0.05)
        pool.release(connection, discard=True)  # the waiter opens a fresh one in the slot
        fresh = await asyncio.wait_for(waiting, 2)
        assert connection.is_closed() and fresh is not connection
        assert await fresh.fetchval("SELECT 1") == 1

        await fresh.execute("BEGIN")
        pool.release(fresh)  # a transaction left open is never handed on
        assert fresh.is_closed()
        assert pool.checked_out() == 0
    finally:
        await pool.close()

    nowhere = PostgresPool(
        make_url(f"postgresql://postgres@127.0.0.1:{free_port()}/none"),
        {"timeout": 1},
        max_size=1,
        acquire_timeout=2,
        recycle_seconds=60,
    )
    for _ in range(3):  # each failed open gives its slot back
        with pytest.raises(ConnectionRefusedError):
            await nowhere.acquire()
    assert nowhere.checked_out() == 0
    await nowhere.close()


async def test_reuse_is_most_recent_first_and_old_connections_are_replaced(
    pg: PostgresServer,
) -> None:
    pool = _pool(pg, size=3, recycle=1)
    try:
        a, b = await pool.acquire(), await pool.acquire()
        pool.release(a)
        pool.release(b)
        assert await pool.acquire() is b  # the warmest
        pool.release(b)
        await asyncio.sleep(1.6)  # older than the recycle age: the sweep closed both idle ones
        assert a.is_closed() and b.is_closed()
        c = await pool.acquire()
        assert c not in (a, b) and await c.fetchval("SELECT 1") == 1
        await asyncio.sleep(1.1)
        pool.release(c)  # too old when released: closed, not reused
        assert c.is_closed()
    finally:
        await pool.close()


async def test_a_closed_pool_refuses_and_wakes_its_waiters(pg: PostgresServer) -> None:
    pool = _pool(pg, size=1, timeout=5)
    held = await pool.acquire()
    waiting = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0.05)
    closing = asyncio.create_task(pool.close())
    with pytest.raises(asyncpg.InterfaceError):
        await asyncio.wait_for(waiting, 2)
    pool.release(held)  # the unit of work ends during shutdown: closed, close() returns
    await asyncio.wait_for(closing, 2)
    assert held.is_closed()
    with pytest.raises(asyncpg.InterfaceError):
        await pool.acquire()
