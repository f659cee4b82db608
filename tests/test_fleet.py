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
import os
import re
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import yaml

from harness import fleet as fleet_rig
from harness.fleet import JOB, NAMESPACE, Fleet, Instance
from harness.pgbouncer import PgBouncer
from harness.postgres import PostgresServer
from harness.processes import wait_until
from harness.servers import production_env
from tests.support.app import migrated_database
from tests.support.helm import rendered_rules
from tests.support.load import Load, exactly_once
from tests.support.skips import missing
from tests.support.sse import each_event

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "chart" / "files" / "dashboard.json"
# Series a cluster has and this rig does not run: the panels that read them are exempt.
FROM_THE_CLUSTER = {
    "kube_horizontalpodautoscaler_": "kube-state-metrics",
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


STEP = (100, 600)  # concurrent streams before and after the load step
PHASES = (20.0, 55.0)  # seconds of each (the ramp to 600 takes the client 15-20 s)
IN_FLIGHT_TARGET = "100"  # the HPA's averageValue in this rehearsal


class StreamHolders:
    """Keeps `target` streams open through the Service: each holder creates an item, then
    streams generations for it back to back, so the in-flight count is the clients'. A
    connection cut mid-stream is resumed with Last-Event-ID, as an EventSource client does;
    the cut is recorded (with HAProxy's account of it) and must stay rare."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.target = 0
        self.holders: list[asyncio.Task[None]] = []
        self.started = 0
        self.completed = 0
        self.failures: Counter[str] = Counter()
        self.cuts: list[str] = []  # when, what, which instance: each was resumed
        self.stopping = False

    async def hold(self, client: Any, index: int) -> None:
        item = None
        while item is None and not self.stopping:
            created = await client.post("/v1/items", json={"name": f"hpa-{index}", "price": 1})
            if created.status_code == 201:
                item = created.json()["id"]
            else:
                self.failures[f"create {created.status_code}"] += 1
                await asyncio.sleep(0.5)
        generation, last_id, served_by = None, "0", ""
        while not self.stopping and index < self.target:
            if generation is None:
                request = client.build_request("POST", f"/v1/items/{item}/generate", json={})
            else:
                request = client.build_request(
                    "GET",
                    f"/v1/generations/{generation}/events",
                    headers={"Last-Event-ID": last_id},
                )
            try:
                response = await client.send(request, stream=True)
                try:
                    if response.status_code != 200:
                        self.failures[f"{request.method} {response.status_code}"] += 1
                        generation = None
                        await asyncio.sleep(0.5)
                        continue
                    served_by = response.headers.get("x-served-by", "")
                    if generation is None:
                        self.started += 1
                    async for event, event_id, payload in each_event(response):
                        if self.stopping:
                            break
                        if event == "generation":
                            generation = payload["generation_id"]
                        elif event == "token":
                            last_id = event_id or last_id
                        elif event == "done":
                            self.completed += 1
                            generation, last_id = None, "0"
                        elif event == "error":
                            self.failures[str(payload.get("error", payload))[:60]] += 1
                            generation = None
                finally:
                    await response.aclose()
            except httpx.HTTPError as error:
                what = f"{time.strftime('%H:%M:%S')} {request.method} {type(error).__name__}"
                # Resumed from its last event, or (cut before its first) asked for again.
                self.cuts.append(f"{what} {error!r} on {served_by or '?'}")
                await asyncio.sleep(0.5)

    def scale_to(self, client: Any, target: int) -> None:
        self.target = target
        while len(self.holders) < target:
            self.holders.append(asyncio.create_task(self.hold(client, len(self.holders))))


async def test_the_autoscaling_signal_through_a_load_step(
    pg: PostgresServer, pgbouncer_modern: PgBouncer, database: str
) -> None:
    """The HPA's input and decision on real series: the fleet carries 100 concurrent streams,
    then 600; Prometheus scrapes the in-flight gauge, prometheus-adapter's rule
    (k8s/prometheus-adapter-values.yaml) is evaluated as the adapter would, and the HPA the
    chart renders for production (its metrics, targets and behavior) is computed from those
    series and the instances' CPU, sync by sync (harness/hpa.py). It stays at minReplicas
    before the step, reaches ceil(600 / target) within one scale-up period of the load
    arriving, and does not flap while the load holds."""
    _fleet_or_skip()
    from harness.hpa import Autoscaler, Sample, adapter_query
    from tests.support.helm import render

    rendered = render(
        "production-values.yaml",
        f"autoscaling.inFlightRequests.averageValue={IN_FLIGHT_TARGET}",
    )
    manifest = rendered.one("HorizontalPodAutoscaler", "api")
    deployment = rendered.one("Deployment", "api")
    cpu_request = _cores(
        deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]
    )
    adapter = yaml.safe_load((ROOT / "k8s" / "prometheus-adapter-values.yaml").read_text())
    rule = adapter["rules"]["custom"][0]
    env = _env(pg, pgbouncer_modern, database) | {"MOCK_TOKENS": "300", "MOCK_TOKEN_DELAY": "0.2"}
    with Fleet(env, rules=rendered_rules(), bouncer=f"127.0.0.1:{pgbouncer_modern.port}") as fleet:
        pods = [i.name for i in fleet.instances]
        cpu: list[tuple[float, float]] = []
        holders = StreamHolders(fleet.base)
        moments: dict[str, float] = {}
        limits = httpx.Limits(max_connections=STEP[1] + 20)
        timeout = httpx.Timeout(30, read=120)
        async with httpx.AsyncClient(base_url=fleet.base, limits=limits, timeout=timeout) as client:

            async def sample_cpu() -> None:
                while not holders.stopping:
                    cpu.append((time.time(), sum(i.cpu_seconds() for i in fleet.instances)))
                    await asyncio.sleep(1)

            sampler = asyncio.create_task(sample_cpu())
            moments["start"] = time.time()
            holders.scale_to(client, STEP[0])
            await asyncio.sleep(PHASES[0])
            moments["step"] = time.time()
            holders.scale_to(client, STEP[1])
            await asyncio.sleep(PHASES[1])
            moments["end"] = time.time()
            holders.stopping = True
            for task in holders.holders:
                task.cancel()
            await asyncio.gather(*holders.holders, sampler, return_exceptions=True)
        cut = fleet.cut_sessions()

        await asyncio.sleep(2)  # the last scrape
        assert fleet.series(rule["seriesQuery"]), "the adapter's seriesQuery finds no series"
        query = adapter_query(rule, NAMESPACE, pods)
        per_pod = fleet.query_range(query, moments["start"], moments["end"], 1)
        assert {s["metric"].get("pod") for s in per_pod} == set(pods), per_pod
        in_flight: dict[int, float] = {}
        for series in per_pod:
            for at, value in series["values"]:
                in_flight[int(at)] = in_flight.get(int(at), 0.0) + float(value)

    def cpu_cores(at: float, window: float = 15) -> float:
        inside = [(t, s) for t, s in cpu if at - window <= t <= at]
        if len(inside) < 2:
            return 0.0
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    start = int(moments["start"])
    syncs = [
        Sample(at - start, in_flight.get(at, 0.0), cpu_cores(at))
        for at in range(start + 15, int(moments["end"]) + 1, 15)
    ]
    hpa = Autoscaler.from_manifest(manifest, cpu_request)
    proposals, decisions = [], []
    for sample in syncs:  # recommend(), with each sync's proposals kept for the timeline
        proposals.append(hpa.proposals(sample))
        decisions.append((sample.at, hpa.sync(sample)))
    step_at = moments["step"] - start
    target = float(IN_FLIGHT_TARGET)
    expected = -(-STEP[1] // int(target))  # ceil
    print(f"\nautoscaling signal: adapter query {query}")
    print(
        f"  HPA: {hpa.min_replicas}..{hpa.max_replicas} replicas, in-flight target {target:g}, "
        f"CPU {hpa.cpu_target_percent:g}% of {cpu_request:g} core; step at {step_at:.0f} s; "
        f"streams completed {holders.completed}, failures {dict(holders.failures)}, "
        f"cut and resumed {len(holders.cuts)}"
    )
    for sample, proposed, (_, replicas) in zip(syncs, proposals, decisions, strict=True):
        print(
            f"  t={sample.at:5.0f} s  in-flight {sample.pods_metric:5.0f}  CPU "
            f"{sample.cpu_cores:4.2f} cores  proposals {proposed}"
            f"  -> {replicas} replicas"
        )
    _plot(in_flight, start, syncs, decisions, step_at, target, hpa.min_replicas)

    before = [r for s, (_, r) in zip(syncs, decisions, strict=True) if s.at < step_at]
    assert before and set(before) == {hpa.min_replicas}, decisions
    full = [
        (s.at, r)
        for s, (_, r) in zip(syncs, decisions, strict=True)
        if s.at > step_at and s.pods_metric >= 0.95 * STEP[1]
    ]
    assert full, f"the load never reached {STEP[1]} in-flight streams: {syncs}"
    reached_at, first = full[0]
    assert reached_at - step_at <= 30, "the ramp to 600 took more than two syncs"
    assert first == expected, (
        f"the first sync under the full load recommends {first}, "
        f"not ceil({STEP[1]} / {target:g}) = {expected}"
    )
    after = [r for s, (_, r) in zip(syncs, decisions, strict=True) if s.at >= reached_at]
    assert set(after) == {expected}, f"flapping under a steady load: {after}"
    assert not holders.failures, (holders.failures, holders.cuts, cut[-20:])
    # A cut stream resumed is served, but a cut on loopback is still a defect to explain:
    # more than one in a hundred streams fails the rehearsal.
    assert len(holders.cuts) <= holders.started // 100, (holders.cuts, cut[-20:])


def _cores(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _plot(
    in_flight: dict[int, float],
    start: int,
    syncs: list[Any],
    decisions: list[tuple[float, int]],
    step_at: float,
    target: float,
    minimum: int,
) -> None:
    """bench/results/autoscaling.png: the measured signal and the recommendation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = ROOT / "bench" / "results" / "autoscaling.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    times = sorted(in_flight)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    top.plot(
        [t - start for t in times],
        [in_flight[t] for t in times],
        label="in-flight (sum, Prometheus)",
    )
    top.step(
        [s.at for s in syncs],
        [s.pods_metric / r for s, (_, r) in zip(syncs, decisions, strict=True)],
        where="post",
        label="per pod at the recommended count",
    )
    top.axhline(target, linestyle="--", color="grey", label=f"target averageValue {target:g}")
    top.axvline(step_at, color="red", linewidth=0.8)
    top.set_ylabel("requests in flight")
    top.legend(fontsize=8)
    bottom.step([at for at, _ in decisions], [r for _, r in decisions], where="post", marker="o")
    bottom.axhline(minimum, linestyle=":", color="grey", label="minReplicas")
    bottom.axvline(step_at, color="red", linewidth=0.8, label="load step 100 -> 600 streams")
    bottom.set_ylabel("recommended replicas")
    bottom.set_xlabel("seconds (one point per 15 s HPA sync)")
    bottom.legend(fontsize=8)
    fig.suptitle("The chart's HPA computed from the fleet's measured series")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    print(f"  picture: {out}")


# The rehearsal's durations: ItemstreamDatabaseUnavailable as rendered with a shorter `for`
# and rate window (chart values) so an outage, the page and its resolution fit in CI.
ALERT_FOR, ALERT_WINDOW = 15, 30
QUIET_SECONDS = float(os.environ.get("FLEET_QUIET_SECONDS", "180"))


async def _trace_through(fleet: Fleet) -> dict[str, Any]:
    """A request with a sampled `traceparent` through the Service, then what the OTLP
    receiver holds: the pods it heard from, and whether the caller's trace was continued."""
    receiver = fleet.traces
    assert receiver is not None
    trace_id = secrets.token_hex(16)
    async with httpx.AsyncClient(base_url=fleet.base) as client:
        answer = await client.get(
            "/v1/items?per_page=1",
            headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
        )
    assert answer.status_code == 200, answer.text

    def arrived() -> bool:
        return any(span.trace_id == trace_id for span in receiver.spans)

    continued = await asyncio.to_thread(wait_until, arrived, 15)  # the batch exporter's delay
    spans = list(receiver.spans)
    pods = {str(span.resource.get("k8s.pod.name")) for span in spans}
    ours = [s for s in spans if s.trace_id == trace_id]
    return {
        "pods": pods,
        "continued": continued,
        "summary": f"{len(spans)} spans from {sorted(pods)}; the caller's trace: "
        + ", ".join(f"{s.name} on {s.resource.get('k8s.pod.name')}" for s in ours[:4]),
    }


DATABASE_ALERT = "ItemstreamDatabaseUnavailable"


async def test_quiet_under_load_then_a_database_outage_pages_and_resolves() -> None:
    """QUIET_SECONDS (3 minutes) of steady load, clients hanging up mid-stream among it
    (disconnects are not errors: the error ratio the burn-rate alerts read stays 0), with no
    alert pending or firing once the first scrapes are in; then every panel of the chart's
    dashboard returns data from the rig's Prometheus (PgBouncer's through its exporter; only
    kube-state-metrics' series are a cluster's), every rule evaluates without error, and
    every instance's traces reached the OTLP receiver, a caller's sampled trace continued by
    the instance that served it. Then PostgreSQL is killed for longer than
    ItemstreamDatabaseUnavailable's `for`: it goes pending, then firing (read from
    Prometheus' API), and resolves once the database is back and the failures leave the rate
    window; the alert timeline is printed."""
    _fleet_or_skip()
    from harness.postgres import throwaway_cluster
    from tests.support.app import start_bouncer

    own = throwaway_cluster()  # ours to kill: never the shared server
    bouncer = start_bouncer("modern", own)
    try:
        database = own.create_database("itemstream_alerts")
        from app.db.migrations import migrate

        await migrate(own.url(database))
        rules = rendered_rules(
            sets=(
                f"prometheusRule.databaseUnavailableFor={ALERT_FOR}s",
                f"prometheusRule.databaseUnavailableWindow={ALERT_WINDOW}s",
            )
        )
        with Fleet(
            _env(own, bouncer, database), rules=rules, bouncer=f"127.0.0.1:{bouncer.port}"
        ) as fleet:
            await _rehearse_outage(fleet, own)
    finally:
        bouncer.close()
        own.close()


async def _rehearse_outage(fleet: Fleet, own: Any) -> None:
    timeline: list[tuple[float, dict[str, str]]] = []
    moments: dict[str, float] = {}
    quiet_statuses: dict[str, float] = {}

    def states() -> dict[str, str]:
        return {a["labels"]["alertname"]: a["state"] for a in fleet.alerts()}

    async def watch() -> None:
        while "done" not in moments:
            timeline.append((time.monotonic(), await asyncio.to_thread(states)))
            await asyncio.sleep(1)

    async def until(check: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if timeline and check(timeline[-1][1]):
                return True
            await asyncio.sleep(0.5)
        return False

    now = time.monotonic()
    load = Load(
        fleet.base,
        writers=4,
        readers=2,
        generations=6,
        generation_tokens=300,
        repeat_generations=True,
        generation_stagger=2.5,
        # Every stream's client running then leaves (and resumes).
        hang_ups=[now + 6, now + 10, now + 14, now + QUIET_SECONDS / 2],
    )
    seen: dict[str, list[str]] = {}
    traced: dict[str, Any] = {}

    async def script() -> None:
        watcher = asyncio.create_task(watch())
        await asyncio.sleep(QUIET_SECONDS)
        for title, expr in dashboard_queries():
            values = await asyncio.to_thread(fleet.query, expr)
            seen[expr] = [f"{title}: {v['metric']} = {v['value'][1]}" for v in values]
        traced.update(await _trace_through(fleet))
        traced["rule problems"] = fleet.rule_health()
        # What the burn-rate alerts read, over the disconnects: responses by status.
        by_status = await asyncio.to_thread(
            fleet.query,
            f'sum by (status) (increase(http_requests_total{{namespace="{NAMESPACE}", '
            f'job="{JOB}"}}[1m]))',
        )
        quiet_statuses.update({s["metric"]["status"]: float(s["value"][1]) for s in by_status})
        moments["quiet"] = time.monotonic()
        moments["stop"] = time.monotonic()
        await asyncio.to_thread(own.crash)
        fired = await until(lambda s: s.get(DATABASE_ALERT) == "firing", ALERT_FOR + 40)
        moments["fired"] = time.monotonic()
        await asyncio.sleep(3)
        moments["back"] = time.monotonic()
        await asyncio.to_thread(own.restart)
        resolved = await until(lambda s: DATABASE_ALERT not in s, ALERT_WINDOW + 60)
        moments["resolved"] = time.monotonic()
        moments["done"] = time.monotonic()
        await watcher
        assert fired, f"{DATABASE_ALERT} never fired: {timeline[-5:]}"
        assert resolved, f"{DATABASE_ALERT} never resolved: {timeline[-5:]}"

    started = time.monotonic()
    await load.run(script())
    origin = moments["stop"]
    print(
        f"\nphases: quiet {moments['quiet'] - started:.0f} s, outage to resolved "
        f"{moments['resolved'] - moments['stop']:.0f} s, clients done "
        f"{time.monotonic() - moments['done']:.0f} s later"
    )
    changes: list[str] = []
    last: dict[str, str] = {}
    for at, now_states in timeline:
        if now_states != last:
            changes.append(f"{at - origin:+6.1f} s {now_states or 'no alert'}")
            last = now_states
    print(
        f"\nalert timeline (0 = PostgreSQL killed; back at {moments['back'] - origin:+.1f} s):\n  "
        + "\n  ".join(changes)
    )
    streams_left = sum(len(s.hung_up) for s in load.streams)
    print(
        f"  before the outage: {streams_left} client disconnects mid-stream; responses of the "
        f"last minute by status: { {k: round(v) for k, v in sorted(quiet_statuses.items())} }"
    )
    # Before the outage nothing fires, and nothing is even pending once the first scrapes are
    # in (ItemstreamMetricsAbsent may be pending for the second before them).
    before = [(at - origin, s) for at, s in timeline if at < moments["quiet"]]
    assert all("firing" not in s.values() for _, s in before), before
    assert all(not s for at, s in before if at > before[0][0] + 10), before
    assert streams_left >= 6 and quiet_statuses, quiet_statuses
    for expr, lines in seen.items():
        print(f"  {expr[:90]}: {len(lines)} series; " + "; ".join(lines[:2])[:160])
    print(f"  traces: {traced['summary']}")
    empty = [
        expr
        for expr, lines in seen.items()
        if not lines and not any(prefix in expr for prefix in FROM_THE_CLUSTER)
    ]
    assert not empty, f"dashboard queries without data: {empty}"
    assert not traced["rule problems"], traced["rule problems"]
    assert traced["pods"] == {i.name for i in fleet.instances}, traced["pods"]
    assert traced["continued"], "the caller's sampled trace was not continued"
    assert not any(k.startswith("5") and v > 0 for k, v in quiet_statuses.items()), (
        "client disconnects counted as server errors",
        quiet_statuses,
    )
    pending = [at for at, s in timeline if s.get(DATABASE_ALERT) == "pending"]
    firing = [at for at, s in timeline if s.get(DATABASE_ALERT) == "firing"]
    assert pending and firing and min(pending) < min(firing)
    assert min(firing) - min(pending) >= ALERT_FOR - 1, "fired before its `for`"
    assert min(firing) - origin <= ALERT_FOR + 20, "slower than `for` plus scrape and evaluation"
    assert moments["resolved"] > moments["back"]


@dataclass(frozen=True)
class Timings:
    """A chart's shutdown timings as its pods run them (its default values rendered)."""

    pre_stop: float
    grace: float  # terminationGracePeriodSeconds: SIGKILL this long after preStop begins
    env: dict[str, str]  # the settings they give the app

    @classmethod
    def of(cls, chart: Path) -> Timings:
        from tests.support.helm import TRY_OUT, Rendered, helm

        try_out = chart / "ci" / TRY_OUT  # releases before it rendered their bare defaults
        values = ["-f", str(try_out)] if try_out.exists() else []
        out = helm("template", "demo", str(chart), *values, "-n", NAMESPACE).stdout
        rendered = Rendered([o for o in yaml.safe_load_all(out) if o])
        config = rendered.one("ConfigMap", "api")["data"]
        pod = rendered.one("Deployment", "api")["spec"]["template"]["spec"]
        container = pod["containers"][0]
        return cls(
            float(container["lifecycle"]["preStop"]["sleep"]["seconds"]),
            float(pod["terminationGracePeriodSeconds"]),
            {k: config[k] for k in ("GUNICORN_GRACEFUL_TIMEOUT", "STREAM_DRAIN_SECONDS")},
        )


async def test_a_rolling_upgrade_across_a_migration_serves_throughout(
    pg: PostgresServer, pgbouncer_modern: PgBouncer
) -> None:
    """The fleet starts on the previous release (the commit before tenancy, a worktree) with
    its chart's shutdown timings, this release's migrations run under load while it serves,
    then each instance is replaced in turn as a rollout does (endpoint drained for the old
    pod's preStop, SIGTERM, gunicorn's graceful shutdown with the stream drain, SIGKILL at
    its grace period; the new release, with this chart's timings, ready before it takes
    requests); then one more rollout of this release (a restart) replaces the instance
    running the most streams. No client request fails except as 503 + Retry-After (retried,
    keyed writes with their Idempotency-Key), every acknowledged write is stored once, every
    running instance of either release stays ready, every stream's client holds exactly the
    stored text, and no stream is cut by this release's pods: only the previous release's
    10 s drain may end one (its record `failed`, "shut down")."""
    _fleet_or_skip()
    from harness.releases import BEFORE_TENANCY, ReleaseUnavailable, checked_out, require
    from harness.servers import run_cli

    try:
        require(BEFORE_TENANCY)
    except ReleaseUnavailable as error:
        missing(str(error))
    database = pg.create_database("itemstream_rollout")
    try:
        with checked_out(BEFORE_TENANCY) as previous:
            old, new = Timings.of(previous / "chart"), Timings.of(ROOT / "chart")
            env = _env(pg, pgbouncer_modern, database)
            migrated = run_cli("migrate", env=env, cwd=previous)
            assert migrated.returncode == 0, migrated.stdout + migrated.stderr
            with Fleet({**env, **old.env}, tree=previous) as fleet:
                await _roll_out(fleet, env, old, new, pg, database)
    finally:
        pg.drop_database(database)


async def _roll_out(
    fleet: Fleet,
    env: dict[str, str],
    old: Timings,
    new: Timings,
    pg: PostgresServer,
    database: str,
) -> None:
    from harness.servers import run_cli

    replacing: set[str] = set()
    not_ready: list[str] = []
    terminated: list[tuple[str, float, str]] = []  # (instance, SIGTERM moment, its release)
    timings: list[dict[str, float]] = []
    moments: dict[str, float] = {}

    async def watch_readiness() -> None:
        while "done" not in moments:
            for instance in fleet.instances:
                if instance.name in replacing:
                    continue  # a terminating pod is not expected ready
                ready = await asyncio.to_thread(fleet.ready, instance)
                if not ready and instance.name not in replacing:
                    not_ready.append(f"{instance.name} ({instance.tree.name})")
            await asyncio.sleep(0.5)

    async def replace(instance: Instance, timing: Timings) -> None:
        release = "previous" if instance.tree != ROOT else "this"
        replacing.add(instance.name)
        step = await asyncio.to_thread(
            fleet.replace, instance, ROOT, timing.pre_stop, timing.grace, new.env
        )
        replacing.discard(instance.name)
        terminated.append((instance.name, step["sigterm_at"], release))
        timings.append(step)

    async def script() -> None:
        watcher = asyncio.create_task(watch_readiness())
        await asyncio.sleep(3)
        started = time.monotonic()
        upgrade = await asyncio.to_thread(run_cli, "migrate", env=env)
        moments["migration"] = time.monotonic() - started
        assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
        await asyncio.sleep(2)
        for instance in fleet.instances:  # the old pods terminate with their own timings
            await replace(instance, old)
        await asyncio.sleep(2)
        # A rollout of this release: the pod with the most streams running goes.
        now = time.monotonic()
        running = Counter(s.served_by for s in load.streams if s.started < now and not s.ended)
        busiest = max(fleet.instances, key=lambda i: running[i.name])
        moments["busiest_streams"] = running[busiest.name]
        await replace(busiest, new)
        await asyncio.sleep(2)
        moments["done"] = time.monotonic()
        await watcher

    load = Load(
        fleet.base,
        writers=8,
        readers=4,
        generations=9,
        generation_tokens=400,  # 20 s: longer than the previous release's preStop + drain
        repeat_generations=True,
        generation_stagger=2.2,
    )
    await load.run(script())
    assert all(i.tree == ROOT for i in fleet.instances)
    failed = [o for o in load.outcomes if not o.ok]
    refused = [o for o in failed if o.status == 503 and o.retry_after]
    rows = await _rows(pg, database)
    lost, duplicated, _ = exactly_once(load, rows)
    ended: Counter[str] = Counter()
    drained: Counter[str] = Counter()  # streams running on a pod at its SIGTERM, by release
    past_sigterm = 0.0  # how long a stream ran on after this release's SIGTERM
    for stream in load.streams:
        row = await _generation(pg, database, stream.generation_id)
        stored = row["output"] or ""
        outcome = row["status"] + (f" ({row['error'][:40]})" if row["error"] else "")
        ended[outcome] += 1
        assert stream.received == stored, (stream, row)
        on_sigterm = [
            release
            for name, at, release in terminated
            if name == stream.served_by and stream.started < at < stream.ended
        ]
        for release in on_sigterm:
            drained[f"{release}: {outcome}"] += 1
        if "this" in on_sigterm:
            at = next(a for n, a, r in terminated if n == stream.served_by and r == "this")
            past_sigterm = max(past_sigterm, stream.ended - at)
        if "this" in on_sigterm or not on_sigterm:
            assert row["status"] == "completed", (stream, row)
        else:
            assert row["status"] == "completed" or "shut" in (row["error"] or ""), row
    print(
        f"\nrolling upgrade: migration {moments['migration']:.2f} s under load; replacements "
        + ", ".join(
            f"preStop {t['pre_stop']:.1f} + shutdown {t['shutdown']:.1f} + start {t['start']:.1f} s"
            for t in timings
        )
        + f"; {len(load.outcomes)} requests, {len(failed)} not 2xx ({len(refused)} of them "
        f"503 + Retry-After, retried); {len(load.acknowledged)} writes acknowledged, lost "
        f"{len(lost)}, duplicated {len(duplicated)}; streams {dict(ended)}; running at their "
        f"pod's SIGTERM {dict(drained)} (on this release's, until +{past_sigterm:.1f} s); "
        f"not ready: {not_ready or 'never'}"
    )
    print(
        "  what the streams' clients met: "
        f"{Counter(e[:60] for s in load.streams for e in s.errors)}"
    )
    assert sum(v for k, v in drained.items() if k.startswith("this")) >= 1, drained
    assert failed == refused, sorted({(o.kind, o.status) for o in failed})
    assert not lost and not duplicated, (lost[:3], duplicated[:3])
    assert not not_ready, not_ready
