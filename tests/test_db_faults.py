"""Database and pooler faults, run as an SRE would see them: the chart's PgBouncer (its command
and rendered pgbouncer.ini, 1.24) in front of a PostgreSQL cluster of the test's own, the app
as the chart runs it (gunicorn, 2 workers, production settings), a steady load of keyed
writes and reads, and processes killed under it.

What must hold: never a 5xx other than 503, every 503 with Retry-After, no request longer
than DB_REQUEST_TIMEOUT plus a small margin, recovery within seconds, and every acknowledged
write stored exactly once."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import pytest

from app.db.migrations import migrate
from harness.pgbouncer import MODERN, find_binary
from harness.postgres import PostgresServer, throwaway_cluster
from harness.processes import free_port, run_coroutine, stop, wait_until
from tests.support.chart_runtime import (
    Cluster,
    RenderedPgBouncer,
    external_database_cluster,
    start_api,
)
from tests.support.skips import missing

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

PASSWORD = "fault-test"
# The chart's default (config.dbRequestTimeout), which PgBouncer's query_wait_timeout follows.
REQUEST_BOUND = 5.0
MARGIN = 1.5


@dataclass
class Stack:
    pg: PostgresServer
    database: str
    cluster: Cluster
    bouncer: RenderedPgBouncer
    app: subprocess.Popen[bytes]
    base: str
    work_dir: Path

    def app_log(self) -> str:
        return (self.work_dir / "app.log").read_text(errors="replace")[-4000:]

    async def rows_by_name(self) -> dict[str, int]:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=self.pg.port, user="postgres", database=self.database
        )
        try:
            rows = await conn.fetch("SELECT name, count(*) AS n FROM items GROUP BY name")
        finally:
            await conn.close()
        return {row["name"]: row["n"] for row in rows}


def _stack(*sets: str) -> Iterator[Stack]:
    binary = find_binary(MODERN)
    if binary is None:
        missing("no modern PgBouncer (>= 1.21); run `make test`")
    assert binary is not None
    # Not pytest's tmp_path: PgBouncer runs unprivileged, and that directory is root's.
    work_dir = Path(tempfile.mkdtemp(prefix="itemstream-faults-"))
    pg = throwaway_cluster()  # ours to kill: never the shared server
    app: subprocess.Popen[bytes] | None = None
    bouncers: list[RenderedPgBouncer] = []
    try:
        database = pg.create_database("faults")
        run_coroutine(lambda: migrate(pg.url(database)))
        bouncer_port, app_port = free_port(), free_port()
        cluster = external_database_cluster(
            pg.port, database, "postgres", PASSWORD, bouncer_port, work_dir, *sets
        )
        bouncer = RenderedPgBouncer(cluster, binary, work_dir, bouncer_port).prepare().start()
        bouncers.append(bouncer)
        app = start_api(cluster, work_dir, app_port)
        base = f"http://127.0.0.1:{app_port}"

        def ready() -> bool:
            try:
                return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        stack = Stack(pg, database, cluster, bouncer, app, base, work_dir)
        assert wait_until(ready, 60), stack.app_log()
        yield stack
    finally:
        if app is not None:
            stop(app)
        for bouncer in bouncers:
            bouncer.kill()
        pg.close()
        shutil.rmtree(work_dir, ignore_errors=True)


@pytest.fixture
def stack() -> Iterator[Stack]:
    yield from _stack()


@dataclass
class Outcome:
    kind: str
    status: int
    started: float
    elapsed: float
    retry_after: str | None


@dataclass
class Load:
    """Keyed creates (retried with the same Idempotency-Key until acknowledged) and reads,
    from several clients at once, until stopped."""

    base: str
    writers: int = 6
    readers: int = 6
    outcomes: list[Outcome] = field(default_factory=list)
    acknowledged: dict[str, int] = field(default_factory=dict)  # key -> items acknowledged
    stopping: bool = False

    async def _call(self, client: httpx.AsyncClient, kind: str, request: httpx.Request) -> int:
        started = time.monotonic()
        try:
            response = await client.send(request)
            status, retry_after = response.status_code, response.headers.get("retry-after")
        except httpx.HTTPError:
            status, retry_after = 0, None  # a dropped connection is a failure too
        self.outcomes.append(
            Outcome(kind, status, started, time.monotonic() - started, retry_after)
        )
        return status

    async def _writer(self, client: httpx.AsyncClient) -> None:
        while not self.stopping:
            key = uuid.uuid4().hex
            request = client.build_request(
                "POST",
                "/v1/items",
                json={"name": key, "price": 1},
                headers={"Idempotency-Key": key},
            )
            give_up = time.monotonic() + 30
            while time.monotonic() < give_up:  # a started key is finished, even when stopping
                status = await self._call(client, "write", request)
                if status == 201:
                    self.acknowledged[key] = self.acknowledged.get(key, 0) + 1
                    break
                await asyncio.sleep(0.1)

    async def _reader(self, client: httpx.AsyncClient, index: int) -> None:
        while not self.stopping:
            url = "/v1/items?per_page=5" if index % 2 else "/v1/items?q=a&per_page=5"
            await self._call(client, "read", client.build_request("GET", url))
            await asyncio.sleep(0.01)

    async def run(self, script: asyncio.Future[None] | asyncio.Task[None]) -> None:
        limits = httpx.Limits(max_connections=self.writers + self.readers)
        timeout = httpx.Timeout(REQUEST_BOUND + 10)
        async with httpx.AsyncClient(base_url=self.base, limits=limits, timeout=timeout) as client:
            tasks = [asyncio.create_task(self._writer(client)) for _ in range(self.writers)]
            tasks += [asyncio.create_task(self._reader(client, i)) for i in range(self.readers)]
            try:
                await script
            finally:
                self.stopping = True
                await asyncio.wait_for(asyncio.gather(*tasks), 60)

    def of(self, kind: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind == kind]


def _check_no_unexplained_errors(load: Load, stack: Stack) -> None:
    statuses = {o.status for o in load.outcomes}
    assert statuses <= {200, 201, 503}, (sorted(statuses), stack.app_log())
    unavailable = [o for o in load.outcomes if o.status == 503]
    assert all(o.retry_after for o in unavailable), "a 503 without Retry-After"
    slowest = max(o.elapsed for o in load.outcomes)
    assert slowest <= REQUEST_BOUND + MARGIN, f"a request took {slowest:.2f}s"


async def _check_exactly_once(load: Load, stack: Stack) -> None:
    rows = await stack.rows_by_name()
    assert load.acknowledged, "no write was acknowledged"
    assert all(count == 1 for count in load.acknowledged.values())
    doubled = {name: n for name, n in rows.items() if n != 1}
    assert not doubled, f"stored more than once: {doubled}"
    assert set(rows) == set(load.acknowledged), (
        f"{len(set(rows) - set(load.acknowledged))} stored but never acknowledged, "
        f"{len(set(load.acknowledged) - set(rows))} acknowledged but lost"
    )


def _first_success_after(load: Load, moment: float) -> float:
    return (
        min(
            (
                o.started + o.elapsed
                for o in load.outcomes
                if o.status in (200, 201) and o.started >= moment
            ),
            default=float("inf"),
        )
        - moment
    )


async def test_pgbouncer_and_postgres_killed_under_load(stack: Stack) -> None:
    """kill -9 of PgBouncer, then of PostgreSQL, each restarted, under keyed writes and reads."""
    marks: dict[str, float] = {}

    async def faults() -> None:
        await asyncio.sleep(2)
        await asyncio.to_thread(stack.bouncer.kill)  # never block the load's event loop
        await asyncio.sleep(1)
        await asyncio.to_thread(stack.bouncer.start)
        marks["pgbouncer back"] = time.monotonic()
        await asyncio.sleep(3)
        await asyncio.to_thread(stack.pg.crash)
        marks["postgres killed"] = time.monotonic()
        # Longer than the request bound: requests queued in PgBouncer for a server must be
        # answered (503) within the bound, not when PostgreSQL returns.
        await asyncio.sleep(REQUEST_BOUND + 3)
        await asyncio.to_thread(stack.pg.restart)
        marks["postgres back"] = time.monotonic()
        await asyncio.sleep(6)

    load = Load(stack.base)
    await load.run(asyncio.ensure_future(faults()))

    _check_no_unexplained_errors(load, stack)
    during = [o for o in load.outcomes if o.started >= marks["postgres killed"]]
    assert any(o.status == 503 for o in during), "the outage was not observed: test is void"
    # Recovery within seconds of each restart.
    assert _first_success_after(load, marks["pgbouncer back"]) < 3
    assert _first_success_after(load, marks["postgres back"]) < 5
    assert len(load.of("read")) > 100 and len(load.acknowledged) > 50
    await _check_exactly_once(load, stack)


@pytest.fixture
def reuseport_stack() -> Iterator[Stack]:
    # Recycling every 3 s instead of the chart's 60 keeps the test short; the rule it relies
    # on (the pooler's grace period outlasts the recycle age) is pinned in test_chart.py.
    yield from _stack("pgbouncer.extraSettings.so_reuseport=1", "config.dbPoolRecycle=3")


async def test_pgbouncer_rolling_restart_is_invisible(reuseport_stack: Stack) -> None:
    """Two PgBouncer processes on one port (so_reuseport): the old one is SIGTERMed while the
    new one serves, as a rolling update does. PgBouncer >= 1.23 then waits for its clients to
    leave; the app's connection recycling moves them, so the old one exits by itself."""
    stack = reuseport_stack
    old = stack.bouncer
    new = RenderedPgBouncer(stack.cluster, old.binary, stack.work_dir, old.port, name="pgb-new")
    new.prepare()
    exited: dict[str, float] = {}

    async def rollout() -> None:
        await asyncio.sleep(1.5)
        await asyncio.to_thread(new.start)
        await asyncio.sleep(0.5)
        assert old.process is not None
        old.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        while old.process.poll() is None and time.monotonic() - started < 20:
            await asyncio.sleep(0.1)
        exited["after"] = time.monotonic() - started
        await asyncio.sleep(1.5)

    try:
        load = Load(stack.base)
        await load.run(asyncio.ensure_future(rollout()))
        assert old.process is not None
        assert old.process.poll() is not None, "the old PgBouncer still had clients after 20 s"
        assert exited["after"] < 3 + 5, exited  # the recycle age plus a margin
        failed = [o for o in load.outcomes if o.status not in (200, 201)]
        assert not failed, (failed[:5], stack.app_log())
        assert len(load.of("read")) > 100
        await _check_exactly_once(load, stack)
    finally:
        new.kill()
