"""The worker's connection pool (app.db.pool) under random interleavings, against fake
connections: acquire, release, discard, cancellation between any two steps of the event loop,
ageing past the recycle limit, the idle sweep, failing connects, and close.

Invariants, checked after every step:
- in use + idle + opening never exceed the maximum size, and no connection is in two places
  (or idle and closed);
- waiters are served in arrival order: no client gets a connection while one that was already
  waiting before it is still waiting;
- a released slot is always reusable: with nothing held, the pool gives out its full size;
- close wakes every waiter (each fails at once) and leaves nothing open;
- a connection discarded while asyncpg cancels its statement is not cut before PostgreSQL
  acknowledged the cancellation (cutting it cancelled the cancel request: the query ran on in
  PostgreSQL), and keeps its slot until then.

Two of these failed on the pool as it was (the closing note of issue 26 has the interleavings):
a waiter handed a connection and cancelled in the same loop tick left it both in use and idle
(the pool shrank for good), and a waiter told "a slot is free" lost it to a later arrival and
went back to the end of the queue."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sqlalchemy.engine import make_url

from app.db.pool import PostgresPool

MAX_SIZE = 3
RECYCLE = 60.0


class FakeProtocol:
    """asyncpg's protocol state for a statement being cancelled: `acknowledge` is PostgreSQL
    answering the cancel request."""

    def __init__(self) -> None:
        self.cancel: asyncio.Future[None] | None = None

    def _is_cancelling(self) -> bool:
        return self.cancel is not None and not self.cancel.done()

    async def _wait_for_cancellation(self, timeout: float | None = None) -> None:
        if self.cancel is not None:
            await asyncio.shield(self.cancel)

    def acknowledge(self) -> None:
        if self.cancel is not None and not self.cancel.done():
            self.cancel.set_result(None)


class FakeConnection:
    """What the pool needs of an asyncpg connection."""

    def __init__(self, number: int, born: float) -> None:
        self.number = number
        self.born = born
        self.closed = False
        self.in_transaction = False
        self._protocol = FakeProtocol()
        self.cut_while_cancelling = False

    def is_closed(self) -> bool:
        return self.closed

    def is_in_transaction(self) -> bool:
        return self.in_transaction

    def terminate(self) -> None:
        if self._protocol._is_cancelling():
            self.cut_while_cancelling = True
        self.closed = True

    async def close(self) -> None:
        self.closed = True

    def __repr__(self) -> str:
        return f"<conn {self.number}{' closed' if self.closed else ''}>"


@dataclass
class Client:
    arrival: int
    task: asyncio.Task[Any]
    connection: FakeConnection | None = None
    queued: bool = False  # waiting in the pool's queue at the end of the last step


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Factory:
    clock: Clock
    opened: list[FakeConnection] = field(default_factory=list)
    fail_next: bool = False
    slow: bool = False  # a connect takes one more step of the loop

    async def __call__(self, **kwargs: Any) -> FakeConnection:
        if self.slow:
            await asyncio.sleep(0)
        if self.fail_next:
            self.fail_next = False
            raise ConnectionRefusedError("the database is not there")
        connection = FakeConnection(len(self.opened), self.clock())
        self.opened.append(connection)
        return connection


def fake_pool(
    size: int, timeout: float, clock: Clock, factory: Factory | None = None
) -> PostgresPool:
    return PostgresPool(
        make_url("postgresql://fake@127.0.0.1/fake"),
        {},
        max_size=size,
        acquire_timeout=timeout,
        recycle_seconds=RECYCLE,
        connect=factory or Factory(clock),
        clock=clock,
    )


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = Clock()
        self.factory = Factory(self.clock)
        # Waits end by cancellation here (a timeout is one).
        self.pool = fake_pool(MAX_SIZE, 10_000, self.clock, self.factory)
        self.arrivals = 0
        self.pending: list[Client] = []
        self.holding: list[Client] = []
        self.closing: asyncio.Task[None] | None = None

    def teardown(self) -> None:
        for client in self.pending:
            client.task.cancel()
        for connection in self.factory.opened:
            connection._protocol.acknowledge()
        self.loop.run_until_complete(asyncio.sleep(0))
        for client in self.holding:
            self.pool.release(client.connection)
        self.loop.run_until_complete(self.pool.close())
        if self.closing is not None:
            self.loop.run_until_complete(self.closing)
        self.loop.run_until_complete(asyncio.sleep(0))  # the sweeper's cancellation
        self.loop.close()

    # --- driving the loop ---------------------------------------------------------------

    def _step(self, times: int = 1) -> None:
        """Let the event loop run a few iterations, then see who finished."""
        for _ in range(times):
            self.loop.run_until_complete(asyncio.sleep(0))
        still: list[Client] = []
        done: list[Client] = []
        for client in self.pending:
            (done if client.task.done() else still).append(client)
        queued_now = {id(c) for c in still if self._in_queue(c)}
        for client in done:
            if client.task.cancelled() or client.task.exception() is not None:
                continue
            earlier = [
                c for c in still if c.queued and id(c) in queued_now and c.arrival < client.arrival
            ]
            assert not earlier, (
                f"client {client.arrival} got a connection while {earlier[0].arrival}, "
                "waiting in the queue since before it, still waits there"
            )
            client.connection = client.task.result()
            self.holding.append(client)
        for client in still:
            client.queued = id(client) in queued_now
        self.pending = still

    def _in_queue(self, client: Client) -> bool:
        """Whether the client's task waits on one of the pool's waiter futures (not, say, on
        a connect in progress)."""
        awaited = getattr(client.task, "_fut_waiter", None)
        return any(awaited is waiter for waiter in self.pool._waiters)

    # --- rules --------------------------------------------------------------------------

    @precondition(lambda self: self.closing is None)
    @rule()
    def acquire(self) -> None:
        self.arrivals += 1
        task = self.loop.create_task(self.pool.acquire())
        self.pending.append(Client(self.arrivals, task))

    @rule(times=st.integers(1, 3))
    def step(self, times: int) -> None:
        self._step(times)

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        """A request timeout, DB_REQUEST_TIMEOUT during checkout, a client that left: at any
        step, including the one in which the waiter was just handed a connection."""
        client = data.draw(st.sampled_from(self.pending))
        client.task.cancel()

    @precondition(lambda self: self.holding)
    @rule(data=st.data(), discard=st.booleans(), in_transaction=st.booleans())
    def release(self, data: st.DataObject, discard: bool, in_transaction: bool) -> None:
        client = data.draw(st.sampled_from(self.holding))
        self.holding.remove(client)
        assert client.connection is not None
        client.connection.in_transaction = in_transaction
        self.pool.release(client.connection, discard=discard)

    @precondition(lambda self: self.holding)
    @rule(data=st.data())
    def release_mid_statement(self, data: st.DataObject) -> None:
        """The unit of work was cancelled during a statement: asyncpg has a cancel request
        in flight, and the connection is given back in doubt."""
        client = data.draw(st.sampled_from(self.holding))
        self.holding.remove(client)
        assert client.connection is not None
        connection = client.connection
        connection._protocol.cancel = self.loop.create_future()

        async def release() -> None:  # the app releases on the loop
            self.pool.release(connection, discard=True)

        self.loop.run_until_complete(release())

    @precondition(lambda self: self._cancels_in_flight())
    @rule(data=st.data())
    def cancellation_acknowledged(self, data: st.DataObject) -> None:
        connection = data.draw(st.sampled_from(self._cancels_in_flight()))
        connection._protocol.acknowledge()

    def _cancels_in_flight(self) -> list[FakeConnection]:
        return [c for c in self.factory.opened if c._protocol._is_cancelling()]

    @precondition(lambda self: self.holding or self.pool._idle)
    @rule()
    def age(self) -> None:
        """Time passes beyond DB_POOL_RECYCLE: every connection so far is old."""
        self.clock.now += RECYCLE + 1

    @rule()
    def sweep(self) -> None:
        self.pool.sweep()

    @rule(slow=st.booleans())
    def connects(self, slow: bool) -> None:
        """The next connects fail once, or take a step of the loop each."""
        self.factory.fail_next = not slow
        self.factory.slow = slow

    @precondition(lambda self: self.pending or self.holding)
    @rule()
    def close(self) -> None:
        self.closing = self.loop.create_task(self.pool.close())

    # --- invariants ---------------------------------------------------------------------

    @invariant()
    def within_size_and_each_connection_in_one_place(self) -> None:
        pool = self.pool
        idle, in_use = pool._idle, pool._in_use
        cancelling = len(getattr(pool, "_cancelling", ()))
        assert len(idle) + len(in_use) + pool._opening + pool._reserved + cancelling <= MAX_SIZE
        if self.closing is None:  # close cuts what is left after its grace
            assert not any(c.cut_while_cancelling for c in self.factory.opened), (
                "a connection was cut before PostgreSQL acknowledged its cancel request"
            )
        assert pool._reserved >= 0 and pool._opening >= 0
        assert len(set(map(id, idle))) == len(idle), "a connection idle twice"
        assert not {id(c) for c in idle} & {id(c) for c in in_use}, "both idle and in use"
        assert not any(c.closed for c in idle), "a closed connection idle"
        if self.closing is None:  # close cuts what is still held after its grace
            held = [c.connection for c in self.holding]
            assert all(c in in_use for c in held if c is not None), "held but not in use"

    @invariant()
    def close_wakes_every_waiter(self) -> None:
        if self.closing is not None:
            self._step(2)  # close runs, then the waiters it failed
            assert not self.pending, "a waiter still waits on a closed pool"


def _full_size_after_releasing_everything(machine: PoolMachine) -> None:
    """Liveness: with nothing held, the pool gives out its full size at once."""
    for client in machine.pending:
        client.task.cancel()
    for connection in machine.factory.opened:
        connection._protocol.acknowledge()
    machine._step(3)
    for client in list(machine.holding):
        machine.pool.release(client.connection)
    machine.holding.clear()
    if machine.closing is not None:
        return
    machine.factory.fail_next = False

    async def take_all() -> list[Any]:
        async with asyncio.timeout(1):
            return [await machine.pool.acquire() for _ in range(MAX_SIZE)]

    taken = machine.loop.run_until_complete(take_all())
    assert len({id(c) for c in taken}) == MAX_SIZE, "the pool lost a slot"
    for connection in taken:
        machine.pool.release(connection)


class PoolWithLiveness(PoolMachine):
    def teardown(self) -> None:
        _full_size_after_releasing_everything(self)
        super().teardown()


TestPool = PoolWithLiveness.TestCase
TestPool.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


def test_the_reported_cancellation_race_leaves_the_pool_its_size() -> None:
    """The review's reproduction: a waiter handed a connection and cancelled in the same
    tick; then two acquires on an otherwise idle pool of 2 must both succeed."""
    loop = asyncio.new_event_loop()
    clock = Clock()
    pool = fake_pool(2, 0.2, clock)
    try:

        async def race() -> None:
            a, b = await pool.acquire(), await pool.acquire()
            waiter = asyncio.ensure_future(pool.acquire())
            await asyncio.sleep(0)
            pool.release(a)  # handed to the waiter...
            waiter.cancel()  # ...which is cancelled in the same tick
            with pytest.raises(asyncio.CancelledError):
                await waiter
            pool.release(b)
            clock.now += RECYCLE + 1
            pool.sweep()  # closes the idle old ones: every slot must come back
            first, second = await pool.acquire(), await pool.acquire()
            assert first is not second
            pool.release(first)
            pool.release(second)

        loop.run_until_complete(race())
    finally:
        loop.run_until_complete(pool.close())
        loop.close()


def test_a_closed_pool_refuses_at_once() -> None:
    loop = asyncio.new_event_loop()
    pool = fake_pool(1, 1, Clock())
    loop.run_until_complete(pool.close())
    with pytest.raises(asyncpg.InterfaceError):
        loop.run_until_complete(pool.acquire())
    loop.close()


def test_a_waiter_told_a_slot_is_free_keeps_it_against_a_later_arrival() -> None:
    """The review's second reproduction: a released connection is closed (discarded, or past
    its age), the waiter is told to open one in its slot, and a request that arrived later
    must not take the slot first."""
    loop = asyncio.new_event_loop()
    clock = Clock()
    pool = fake_pool(1, 0.2, clock)
    order: list[str] = []
    try:

        async def take(name: str) -> None:
            connection = await pool.acquire()
            order.append(name)
            await asyncio.sleep(0)
            pool.release(connection)

        async def race() -> None:
            held = await pool.acquire()
            waiter = asyncio.ensure_future(take("waiter"))
            await asyncio.sleep(0)  # it waits in the queue
            late = asyncio.ensure_future(take("late"))  # scheduled before the hand-over
            pool.release(held, discard=True)
            await asyncio.gather(waiter, late)

        loop.run_until_complete(race())
        assert order == ["waiter", "late"]
    finally:
        loop.run_until_complete(pool.close())
        loop.close()
