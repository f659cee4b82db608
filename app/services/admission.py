"""Admission for expensive queries, per worker: a bounded number at once, a bounded share of
the time, a bounded wait for a turn, and a bounded database time each.

A cheap read costs PostgreSQL a fraction of a millisecond; a search over the trigram indexes
of a large table, a total, or a list that includes deleted items (no index holds them in
order) can cost a thousand times that. Without a bound, clients that repeat such a query take
every connection of the pool and every core of the database, and every other route waits
behind them. So each worker runs at most `concurrency` of them at once and spends at most
`share` of its time in them (a token bucket of database seconds: each query's time is taken
from it when it ends, and it refills at `share` seconds per second up to one full query);
a query that cannot start within `queue_seconds` is refused (503, Retry-After), and one that
runs longer than `timeout` is cancelled in PostgreSQL (app.db.pool waits for the cancel
request before the connection closes) and answered 422 (narrow it).

Most queries that may be expensive are not: a selective search over the trigram indexes
costs PostgreSQL a millisecond or two. Behind the gate's slots they fell from about 1,500 to
about 500-700 per second on two workers (`make bench`, search route), with the database and
the workers both half idle: under load a query's wall time is mostly its wait for the event
loop, so any small concurrency cap on cheap queries caps their throughput. So a query whose
indexes can answer it is first tried `quickly()`: at once, with no cap but the pool's, while
the budget is positive, cut after QUICK_SECONDS (cancelled in PostgreSQL). One that is cut
pays its time from the budget and goes through `admit()` like any expensive query
(NotQuick): a caller repeating costly searches empties the budget within a few attempts,
after which every such attempt queues at the gate. Queries admitted through the gate are
charged their time, except those that end within FREE_SECONDS.

asyncio.Semaphore and asyncio.timeout do the waiting; the bucket is plain arithmetic
(`Budget`, property-tested in tests/properties/test_admission.py)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from app.domain.errors import InvalidQuery, Overloaded

FREE_SECONDS = 0.005
QUICK_SECONDS = 1.0


class NotQuick(Exception):
    """The quick attempt could not run now or ran out of time: go through `admit()`."""


@dataclass
class Budget:
    """Database seconds a worker may spend on expensive queries: `capacity` at most, refilled
    at `share` per second. A query may start while the balance is positive; its whole time
    is then taken (the balance may go below zero, and later queries wait for it to refill)."""

    share: float
    capacity: float
    balance: float
    at: float

    @classmethod
    def full(cls, share: float, capacity: float, now: float) -> Budget:
        return cls(share=share, capacity=capacity, balance=capacity, at=now)

    def _refill(self, now: float) -> None:
        if now > self.at:
            self.balance = min(self.capacity, self.balance + (now - self.at) * self.share)
            self.at = now

    def wait(self, now: float) -> float:
        """Seconds until a query may start (0: now)."""
        self._refill(now)
        if self.balance > 0:
            return 0.0
        return (-self.balance + 1e-6) / self.share

    def spend(self, seconds: float, now: float) -> None:
        self._refill(now)
        self.balance -= seconds


class QueryGate:
    def __init__(
        self,
        concurrency: int = 1,
        queue_seconds: float = 0.5,
        timeout: float = 2.0,
        share: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.concurrency = concurrency
        self.queue_seconds = queue_seconds
        self.timeout = timeout
        self._slots = asyncio.Semaphore(concurrency)
        self._clock = clock
        self.budget = Budget.full(share, timeout, clock())

    @asynccontextmanager
    async def admit(self, what: str, parameter: str) -> AsyncIterator[None]:
        """Run the block as one expensive query: `what` names it in the refusals, and
        `parameter` the query parameter that made it expensive."""
        await self._turn(what)
        started = self._clock()
        deadline = asyncio.timeout(self.timeout)
        try:
            async with deadline:
                yield
        except TimeoutError:
            if not deadline.expired():
                raise
            raise InvalidQuery(
                f"{what} needs more than {self.timeout:g}s of database time: narrow it "
                "(a longer or more specific q, a narrower price range, fewer pages)",
                parameter,
            ) from None
        finally:
            self._charge(started)
            self._slots.release()

    @asynccontextmanager
    async def quickly(self) -> AsyncIterator[None]:
        """Run the block now, for at most QUICK_SECONDS, or raise NotQuick (the budget is
        spent, or the time ran out)."""
        if self.budget.wait(self._clock()) > 0:
            raise NotQuick
        started = self._clock()
        deadline = asyncio.timeout(QUICK_SECONDS)
        try:
            async with deadline:
                yield
        except TimeoutError:
            if not deadline.expired():
                raise
            self._charge(started)  # an expensive query after all: it pays for the attempt
            raise NotQuick from None

    def _charge(self, started: float) -> None:
        now = self._clock()
        took = now - started
        if took > FREE_SECONDS:
            self.budget.spend(took, now)

    async def _turn(self, what: str) -> None:
        """A slot, and a positive budget, within queue_seconds; else Overloaded."""
        give_up = self._clock() + self.queue_seconds
        refused = f"too many expensive queries in progress to run {what} now; retry shortly"
        try:
            async with asyncio.timeout(self.queue_seconds):
                await self._slots.acquire()
        except TimeoutError:
            raise Overloaded(refused, retry_after=1) from None
        try:
            wait = self.budget.wait(self._clock())
            if wait > give_up - self._clock():
                raise Overloaded(refused, retry_after=max(1, math.ceil(wait)))
            if wait > 0:
                await asyncio.sleep(wait)
        except BaseException:
            self._slots.release()
            raise
