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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from app.db.migrations import migrate
from harness.pgbouncer import MODERN, find_binary
from harness.postgres import PostgresServer, throwaway_cluster
from harness.processes import free_port, run_coroutine, stop, wait_until
from tests.support.chart_runtime import (
    Cluster,
    RenderedPgBouncer,
    answers_ready,
    external_database_cluster,
    start_api,
)
from tests.support.load import REQUEST_BOUND, Load, exactly_once, unexplained_errors
from tests.support.skips import missing

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

PASSWORD = "fault-test"
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

        stack = Stack(pg, database, cluster, bouncer, app, base, work_dir)
        assert wait_until(lambda: answers_ready(base), 60), stack.app_log()
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


def _check_no_unexplained_errors(load: Load, stack: Stack) -> None:
    problems = unexplained_errors(load, MARGIN)
    assert not problems, (problems, stack.app_log())


async def _check_exactly_once(load: Load, stack: Stack) -> None:
    rows = await stack.rows_by_name()
    assert load.acknowledged, "no write was acknowledged"
    lost, duplicated, unacknowledged = exactly_once(load, rows)
    assert not duplicated, f"stored more than once: {duplicated}"
    assert not lost and not unacknowledged, (
        f"{len(unacknowledged)} stored but never acknowledged, {len(lost)} acknowledged but lost"
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
    assert load.first_success_after(marks["pgbouncer back"]) < 3
    assert load.first_success_after(marks["postgres back"]) < 5
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
