"""The service as a fleet (harness/fleet.py): three instances as the chart runs them
(gunicorn, 2 workers, production settings, each its own metrics port) behind HAProxy as the
Service, PgBouncer, PostgreSQL, and a real Prometheus evaluating the chart's recording rules
and alerts every second against the series the instances export.

- Under steady load (keyed writes, reads, streams) every query of the Grafana dashboard
  returns data, every rule evaluates, and no alert is pending or firing.
- An instance killed with SIGKILL under load: only the requests it was serving at that moment
  fail (502 from the Service, as a client would see a reset), HAProxy takes it out, the
  writers' retries with the same Idempotency-Key land elsewhere, every acknowledged write is
  stored exactly once, and the restarted instance serves again."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from harness import fleet as fleet_rig
from harness.fleet import JOB, NAMESPACE, Fleet
from harness.pgbouncer import PgBouncer
from harness.postgres import PostgresServer
from harness.processes import wait_until
from harness.servers import production_env
from tests.support.app import migrated_database
from tests.support.helm import rendered_rules
from tests.support.load import Load, exactly_once
from tests.support.skips import missing

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "chart" / "files" / "dashboard.json"
# Series a cluster has and this rig does not run: the panels that read them are exempt.
FROM_THE_CLUSTER = {
    "kube_horizontalpodautoscaler_": "kube-state-metrics",
    "pgbouncer_pools_": "the PgBouncer exporter (a sidecar of the chart's PgBouncer)",
}


@pytest.fixture(scope="module")
def database(pg: PostgresServer) -> Iterator[str]:
    yield from migrated_database(pg, "itemstream_fleet")


def _env(pg: PostgresServer, bouncer: PgBouncer, database: str) -> dict[str, str]:
    return production_env(
        pg,
        bouncer,
        database,
        MOCK_TOKENS="900",
        MOCK_TOKEN_DELAY="0.05",
    )


def _fleet_or_skip() -> None:
    why = fleet_rig.available()
    if why is not None:
        missing(why)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of the chart's dashboard, with Grafana's
    variables as the rig sets them."""
    board = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = (
                target["expr"]
                .replace("$namespace", NAMESPACE)
                .replace("$job", JOB)
                .replace("$__rate_interval", "30s")
            )
            assert "$" not in expr, f"a Grafana variable the test does not set: {expr}"
            queries.append((panel["title"], expr))
    return queries


async def test_the_dashboard_and_the_alerts_on_the_series_the_fleet_exports(
    pg: PostgresServer, pgbouncer_modern: PgBouncer, database: str
) -> None:
    _fleet_or_skip()
    with Fleet(_env(pg, pgbouncer_modern, database), rules=rendered_rules()) as fleet:
        seen: dict[str, list[str]] = {}

        async def script() -> None:
            await asyncio.sleep(40)  # several rate windows of steady load
            for title, expr in dashboard_queries():
                values = await asyncio.to_thread(fleet.query, expr)
                seen[expr] = [f"{title}: {v['metric']} = {v['value'][1]}" for v in values]

        load = Load(fleet.base, writers=6, readers=4, generations=6, generation_tokens=900)
        await load.run(script())
        alerts = fleet.alerts()
        problems = fleet.rule_health()
        for expr, lines in seen.items():
            print(f"{expr[:90]}: {len(lines)} series; " + "; ".join(lines[:2])[:200])
        print(f"alerts pending or firing: {[a['labels']['alertname'] for a in alerts]}")
        empty = [
            expr
            for expr, lines in seen.items()
            if not lines and not any(prefix in expr for prefix in FROM_THE_CLUSTER)
        ]
        assert not empty, f"dashboard queries without data: {empty}"
        assert not problems, problems
        assert not alerts, [(a["labels"]["alertname"], a["state"]) for a in alerts]
        assert all(o.ok for o in load.outcomes), sorted({o.status for o in load.outcomes})


async def test_an_instance_killed_under_load_loses_no_acknowledged_write(
    pg: PostgresServer, pgbouncer_modern: PgBouncer, database: str
) -> None:
    _fleet_or_skip()
    with Fleet(_env(pg, pgbouncer_modern, database)) as fleet:
        victim = fleet.instances[0]
        moments: dict[str, float] = {}

        async def script() -> None:
            await asyncio.sleep(3)
            moments["kill"] = time.monotonic()
            await asyncio.to_thread(fleet.kill, victim)
            await asyncio.sleep(6)
            moments["restart"] = time.monotonic()
            fleet.start_instance(victim)  # as the kubelet restarts the pod
            assert await asyncio.to_thread(wait_until, lambda: fleet.ready(victim), 60)
            await asyncio.sleep(4)  # HAProxy's rise: two good checks, a second apart

        load = Load(fleet.base, writers=16, readers=4)
        await load.run(script())
        kill = moments["kill"]
        failed = [o for o in load.outcomes if not o.ok]
        rows = await _rows(pg, database)
        lost, duplicated, _ = exactly_once(load, rows)
        served_after = _served_after_restart(victim.output())
        print(
            f"\nfleet [SIGKILL]: {len(load.outcomes)} requests, {len(failed)} failed "
            f"({sorted({o.status for o in failed})}), last failure "
            f"{max((o.started + o.elapsed - kill for o in failed), default=0):.2f} s after the "
            f"kill; {len(load.acknowledged)} writes acknowledged, lost {len(lost)}, duplicated "
            f"{len(duplicated)}; the restarted instance served {served_after} requests"
        )
        print(
            "  failures by second around the kill (status: count): "
            + ", ".join(
                f"{second:+d}s {dict(sorted(Counter(o.status for o in group).items()))}"
                for second, group in itertools.groupby(
                    sorted(failed, key=lambda o: o.started), lambda o: int((o.started - kill) // 1)
                )
            )
        )
        for outcome in failed:
            # Only what the instance was serving when it died: started before, ended at once.
            assert outcome.status in (0, 502), outcome  # a reset, or the Service's 502
            assert outcome.started <= kill + 0.5, outcome
            assert outcome.started + outcome.elapsed <= kill + 3, outcome
        assert not lost and not duplicated, (lost[:3], duplicated[:3])
        assert served_after > 0, "the restarted instance never got traffic back"


async def test_streams_of_an_instance_killed_mid_stream_end_on_the_others(
    pg: PostgresServer, pgbouncer_modern: PgBouncer, database: str
) -> None:
    """Its streams' clients reconnect through the Service with Last-Event-ID to another
    instance: they get what was saved and then the end (failed: abandoned) once the dead
    worker's heartbeat is ABANDONED_AFTER_SECONDS old, never a piece twice; the streams of
    the other instances complete with the stored text equal to the received."""
    _fleet_or_skip()
    with Fleet(_env(pg, pgbouncer_modern, database)) as fleet:
        moments: dict[str, float] = {}

        async def script() -> None:
            await asyncio.sleep(4)
            moments["kill"] = time.monotonic()
            await asyncio.to_thread(fleet.kill, fleet.instances[0])

        load = Load(fleet.base, writers=4, readers=2, generations=9, generation_tokens=900)
        await load.run(script())
        cut = [s for s in load.streams if s.resumes]
        whole = [s for s in load.streams if not s.resumes]
        ends = []
        for stream in load.streams:
            row = await _generation(pg, database, stream.generation_id)
            stored = row["output"] or ""
            assert stream.received.startswith(stored), "the stored text is what the client got"
            if stream in cut:
                assert stream.status == "failed" and "abandoned" in row["error"], (stream, row)
                ends.append(row["finished_at"].timestamp() - time.time() + time.monotonic())
                print(
                    f"  cut stream: {len(stream.received)} characters received, "
                    f"{len(stored)} saved (the last checkpoint before the kill)"
                )
            else:
                assert stream.status == "completed" and stored == stream.received, stream
        print(
            f"\nfleet [SIGKILL mid-stream]: {len(cut)} streams cut and resumed elsewhere, "
            f"ended (failed: abandoned) {max(ends, default=0) - moments['kill']:.1f} s after the "
            f"kill; {len(whole)} streams on the other instances completed"
        )
        assert cut, "no stream ran on the killed instance"
        assert whole, "no stream ran elsewhere"


async def _generation(pg: PostgresServer, database: str, generation_id: str) -> Any:
    conn = await asyncpg.connect(host="127.0.0.1", port=pg.port, user="postgres", database=database)
    try:
        return await conn.fetchrow(
            "SELECT status, output, error, finished_at FROM generations WHERE id = $1::uuid",
            generation_id,
        )
    finally:
        await conn.close()


def _served_after_restart(log: str) -> int:
    """Access lines after the last start of the instance's gunicorn master."""
    starts = [m.end() for m in re.finditer("Starting gunicorn", log)]
    return log[starts[-1] :].count('"itemstream.access"') if starts else 0


async def _rows(pg: PostgresServer, database: str) -> dict[str, int]:
    conn = await asyncpg.connect(host="127.0.0.1", port=pg.port, user="postgres", database=database)
    try:
        rows = await conn.fetch("SELECT name, count(*) AS n FROM items GROUP BY name")
    finally:
        await conn.close()
    return {row["name"]: row["n"] for row in rows}
