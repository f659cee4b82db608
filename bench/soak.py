"""`make soak`: the service as shipped (gunicorn, two workers, PgBouncer 1.24, tracing and
metrics on) under a steady mix for SOAK_SECONDS (1800), in waves of SOAK_WAVE_SECONDS (60) of
load and SOAK_REST_SECONDS (10) of rest. Sends traffic only to loopback and stops by itself.

The mix, at SOAK_RATE operations per second (40) from SOAK_CLIENTS concurrent clients (32):
CRUD chains (create, read, patch, list, soft delete, restore, delete for good), chat streams
(a third closed after the first token), item generations (a third left after the first token
and resumed from their last event id on another connection), exports, and 4xx traffic (bad
bodies, unknown ids, forged cursors, a page past MAX_OFFSET).

Every 5 s it samples each worker's RSS and open file descriptors, the service's event loop
tasks (`itemstream_event_loop_tasks`), requests per second and the p99 of the non-stream
requests of the last 5 s. It prints its own targets (issue 27, target 5) and writes
bench/results/soak-<time>.json and a plot, soak-<time>.png:
- each worker's RSS at the end within 5 % of its RSS after the warm-up (the first 5 minutes,
  or the first sixth of a shorter run);
- descriptors and tasks at the end of every rest back to the first rest's level;
- p99 of the last warm-up-long stretch <= 1.2x the first after warm-up."""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import sys
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.db.migrations import migrate  # noqa: E402
from bench.load import itemstream, running  # noqa: E402
from harness.pgbouncer import MODERN, PgBouncer, find_binary  # noqa: E402
from harness.postgres import throwaway_cluster  # noqa: E402
from harness.processes import memory_kib, run_coroutine, worker_pids  # noqa: E402
from harness.servers import clean_env  # noqa: E402

SECONDS = float(os.environ.get("SOAK_SECONDS", "1800"))
WAVE = float(os.environ.get("SOAK_WAVE_SECONDS", "60"))
REST = float(os.environ.get("SOAK_REST_SECONDS", "10"))
RATE = float(os.environ.get("SOAK_RATE", "40"))
CLIENTS = int(os.environ.get("SOAK_CLIENTS", "32"))
SAMPLE = 5.0
RESULTS = Path(__file__).parent / "results"
FD_SLACK = 2  # a pool connection opened or closed at a rest's edge
TASK_SLACK = 2


@dataclass
class Sample:
    at: float
    resting: bool
    rss_mib: dict[int, float]
    fds: dict[int, int]
    tasks: float | None
    rps: float
    p99_ms: float | None
    errors_5xx: int


@dataclass
class Traffic:
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (end, seconds)
    done: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)

    def count(self, status: int | str) -> None:
        key = str(status)
        self.by_status[key] = self.by_status.get(key, 0) + 1


# --- the mix ---------------------------------------------------------------------------------


async def _timed(
    traffic: Traffic, client: httpx.AsyncClient, method: str, url: str, **kw: Any
) -> httpx.Response:
    started = time.monotonic()
    response = await client.request(method, url, **kw)
    ended = time.monotonic()
    traffic.latencies.append((ended, ended - started))
    traffic.count(response.status_code)
    return response


async def crud(client: httpx.AsyncClient, traffic: Traffic, rng: random.Random) -> None:
    body = {"name": f"soak {uuid.uuid4().hex[:12]}", "description": "soak", "price": 9.5}
    created = await _timed(traffic, client, "POST", "/v1/items", json=body)
    if created.status_code != 201:
        return
    item = created.json()
    path = f"/v1/items/{item['id']}"
    await _timed(traffic, client, "GET", path)
    patched = await _timed(traffic, client, "PATCH", path, json={"price": rng.randint(1, 999)})
    etag = patched.headers.get("etag", "*")
    await _timed(traffic, client, "GET", "/v1/items", params={"per_page": 20, "q": "soak"})
    await _timed(traffic, client, "DELETE", path, headers={"If-Match": etag})
    await _timed(traffic, client, "POST", path + "/restore")
    await _timed(traffic, client, "DELETE", path, params={"permanent": "true"})


async def _events(response: httpx.Response, stop_after: int | None) -> str | None:
    """Reads SSE events; returns the last event id seen (stops after `stop_after` tokens)."""
    last_id, tokens = None, 0
    async for line in response.aiter_lines():
        if line.startswith("id:"):
            last_id = line[3:].strip()
        elif line.startswith("event: token"):
            tokens += 1
            if stop_after is not None and tokens >= stop_after:
                return last_id
    return last_id


async def chat(client: httpx.AsyncClient, traffic: Traffic, rng: random.Random) -> None:
    body = {
        "model": "itemstream-mock",
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    leave = rng.random() < 1 / 3
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        traffic.count(response.status_code)
        if response.status_code == 200:
            async for line in response.aiter_lines():
                if leave and line.startswith("data:"):
                    break


async def generation(client: httpx.AsyncClient, traffic: Traffic, rng: random.Random) -> None:
    created = await _timed(
        traffic, client, "POST", "/v1/items", json={"name": "soak gen", "price": 1}
    )
    if created.status_code != 201:
        return
    item_id = created.json()["id"]
    resume = rng.random() < 1 / 3
    async with client.stream("POST", f"/v1/items/{item_id}/generate") as response:
        traffic.count(response.status_code)
        generation_id = response.headers.get("location", "").rsplit("/", 1)[-1]
        last = (
            await _events(response, 1 if resume else None) if response.status_code == 200 else None
        )
    if resume and generation_id:
        headers = {"Last-Event-ID": last} if last else {}
        async with client.stream(
            "GET", f"/v1/generations/{generation_id}/events", headers=headers
        ) as again:
            traffic.count(again.status_code)
            await _events(again, None)
    await _timed(traffic, client, "DELETE", f"/v1/items/{item_id}", params={"permanent": "true"})


async def exports(client: httpx.AsyncClient, traffic: Traffic, rng: random.Random) -> None:
    async with client.stream(
        "GET", "/v1/items/export", params={"format": rng.choice(["ndjson", "csv"])}
    ) as r:
        traffic.count(r.status_code)
        async for _ in r.aiter_raw():
            pass


async def bad(client: httpx.AsyncClient, traffic: Traffic, rng: random.Random) -> None:
    case = rng.randrange(5)
    if case == 0:
        await _timed(
            traffic,
            client,
            "POST",
            "/v1/items",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
    elif case == 1:
        await _timed(traffic, client, "GET", f"/v1/items/{uuid.uuid4()}")
    elif case == 2:
        await _timed(traffic, client, "GET", "/v1/items", params={"cursor": "forged.cursor"})
    elif case == 3:
        await _timed(traffic, client, "GET", "/v1/items", params={"page": 100000, "per_page": 100})
    else:
        await _timed(traffic, client, "POST", "/v1/items", json={"name": "", "price": -1})


MIX: tuple[tuple[Any, float], ...] = (
    (crud, 0.45),
    (chat, 0.15),
    (generation, 0.1),
    (exports, 0.05),
    (bad, 0.25),
)


async def drive(base: str, traffic: Traffic, load_on: asyncio.Event, stop: asyncio.Event) -> None:
    """Operations at RATE per second while `load_on` is set, at most CLIENTS at once."""
    rng = random.Random(27)  # noqa: S311 - a reproducible mix, not a secret
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    slots = asyncio.Semaphore(CLIENTS)
    running_ops: set[asyncio.Task[None]] = set()
    ops = [op for op, _ in MIX]
    weights = [weight for _, weight in MIX]

    async def one(op: Any) -> None:
        try:
            await op(client, traffic, rng)
            traffic.done += 1
        except Exception as error:  # a soak counts failures, it does not stop on them
            name = type(error).__name__
            traffic.failures[name] = traffic.failures.get(name, 0) + 1
        finally:
            slots.release()

    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        next_at = time.monotonic()
        while not stop.is_set():
            if not load_on.is_set():
                await asyncio.sleep(0.05)
                next_at = time.monotonic()
                continue
            next_at += 1 / RATE
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            await slots.acquire()
            task = asyncio.create_task(one(rng.choices(ops, weights)[0]))
            running_ops.add(task)
            task.add_done_callback(running_ops.discard)
        await asyncio.gather(*running_ops, return_exceptions=True)


# --- sampling --------------------------------------------------------------------------------


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _tasks(base: str) -> float | None:
    try:
        text = httpx.get(base + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("itemstream_event_loop_tasks"):
            return float(line.rsplit(" ", 1)[1])
    return None


async def soak(base: str, master: int) -> list[Sample]:
    traffic = Traffic()
    load_on, stop = asyncio.Event(), asyncio.Event()
    driver = asyncio.create_task(drive(base, traffic, load_on, stop))
    samples: list[Sample] = []
    started = time.monotonic()
    seen_done, seen_5xx = 0, 0
    next_sample = started + SAMPLE
    while (now := time.monotonic()) - started < SECONDS:
        in_cycle = (now - started) % (WAVE + REST)
        resting = in_cycle >= WAVE
        if resting:
            load_on.clear()
        else:
            load_on.set()
        if now >= next_sample:
            next_sample += SAMPLE
            workers = worker_pids(master)
            window = [s for end, s in traffic.latencies if end > now - SAMPLE]
            fives = sum(v for k, v in traffic.by_status.items() if k.startswith("5"))
            samples.append(
                Sample(
                    at=round(now - started, 1),
                    resting=resting and in_cycle >= WAVE + REST - SAMPLE,
                    rss_mib={pid: round(memory_kib(pid) / 1024, 1) for pid in workers},
                    fds={pid: _fds(pid) for pid in workers},
                    tasks=await asyncio.to_thread(_tasks, base),
                    rps=round((traffic.done - seen_done) / SAMPLE, 1),
                    p99_ms=round(_p99(window) * 1000, 1) if len(window) >= 20 else None,
                    errors_5xx=fives - seen_5xx,
                )
            )
            seen_done, seen_5xx = traffic.done, fives
            last = samples[-1]
            print(
                f"  {last.at:>6.0f}s {'rest' if resting else 'load'}  rps {last.rps:>6.1f}  "
                f"p99 {last.p99_ms or 0:>7.1f} ms  rss {sorted(last.rss_mib.values())} MiB  "
                f"fds {sorted(last.fds.values())}  tasks {last.tasks}  5xx {last.errors_5xx}",
                flush=True,
            )
        await asyncio.sleep(0.2)
    stop.set()
    await driver
    print(f"  statuses {dict(sorted(traffic.by_status.items()))}, failures {traffic.failures}")
    return samples


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


# --- the verdict and the plot ----------------------------------------------------------------


def verdict(samples: list[Sample], seconds: float) -> list[tuple[str, str, str, bool]]:
    warm = min(300.0, seconds / 6)
    after_warm = [s for s in samples if s.at >= warm]
    checks: list[tuple[str, str, str, bool]] = []
    if not after_warm:
        return checks
    first, last = after_warm[0], samples[-1]
    for pid, rss in first.rss_mib.items():
        if pid in last.rss_mib:
            growth = last.rss_mib[pid] / rss - 1
            checks.append(
                (
                    f"worker {pid} RSS after warm-up",
                    f"{rss} -> {last.rss_mib[pid]} MiB ({growth:+.1%})",
                    "< +5 %",
                    growth < 0.05,
                )
            )
    rests = [s for s in samples if s.resting]
    if rests:
        base_fds, base_tasks = sum(rests[0].fds.values()), rests[0].tasks
        worst_fds = max(sum(s.fds.values()) for s in rests)
        checks.append(
            (
                "open fds at rest (all workers)",
                f"{base_fds} -> max {worst_fds}",
                f"<= first + {FD_SLACK}",
                worst_fds <= base_fds + FD_SLACK,
            )
        )
        task_counts = [s.tasks for s in rests if s.tasks is not None]
        if base_tasks is not None and task_counts:
            checks.append(
                (
                    "event loop tasks at rest",
                    f"{base_tasks:.0f} -> max {max(task_counts):.0f}",
                    f"<= first + {TASK_SLACK}",
                    max(task_counts) <= base_tasks + TASK_SLACK,
                )
            )
    loaded = [s for s in after_warm if not s.resting and s.p99_ms is not None]
    early = [s.p99_ms for s in loaded if s.at < warm * 2 and s.p99_ms is not None]
    late = [s.p99_ms for s in loaded if s.at >= seconds - warm and s.p99_ms is not None]
    if early and late:
        ratio = statistics.median(late) / statistics.median(early)
        checks.append(
            (
                "p99, last stretch vs first",
                f"{statistics.median(early):.1f} -> {statistics.median(late):.1f} ms ({ratio:.2f}x)",
                "<= 1.2x",
                ratio <= 1.2,
            )
        )
    return checks


def plot(samples: list[Sample], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = [s.at / 60 for s in samples]
    fig, (rss, p99, rps) = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    for pid in samples[0].rss_mib:
        rss.plot(times, [s.rss_mib.get(pid, float("nan")) for s in samples], label=f"worker {pid}")
    rss.set_ylabel("RSS (MiB)")
    rss.legend(loc="lower right")
    p99.plot(times, [s.p99_ms if s.p99_ms is not None else float("nan") for s in samples], ".-")
    p99.set_ylabel("p99 (ms), non-stream")
    rps.plot(times, [s.rps for s in samples])
    rps.set_ylabel("operations / s")
    rps.set_xlabel("minutes")
    for axis in (rss, p99, rps):
        for s in samples:
            if s.resting:
                axis.axvspan(s.at / 60 - SAMPLE / 60, s.at / 60, color="0.9", lw=0)
    fig.suptitle("make soak: itemstream, 2 workers, PgBouncer 1.24 (rests shaded)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    binary = find_binary(MODERN)
    if binary is None:
        sys.exit("soak: needs PgBouncer >= 1.21 (set PGBOUNCER_MODERN; `make soak` does)")
    RESULTS.mkdir(exist_ok=True)
    stamp = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    with ExitStack() as stack:
        pg = throwaway_cluster()
        stack.callback(pg.close)
        database = pg.create_database("soak")
        run_coroutine(lambda: migrate(pg.url(database)))
        bouncer = PgBouncer(binary, MODERN, pg.host, pg.port, pool_size=20).start()
        stack.callback(bouncer.close)
        env = clean_env(
            DATABASE_URL=f"postgresql://postgres@127.0.0.1:{bouncer.port}/{database}",
            MIGRATION_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{pg.port}/{database}",
            DB_POOLER="pgbouncer",
            ENVIRONMENT="production",
            AUTH_ALLOW_UNAUTHENTICATED="true",
            CURSOR_SECRETS="soak-cursor-key-0123456789abcdef",
            MOCK_TOKENS="20",
            MOCK_TOKEN_DELAY="0.05",  # noqa: S106 - a delay, not a password
            LOG_LEVEL="WARNING",
        )
        print(
            f"soak: {SECONDS:.0f} s, waves of {WAVE:.0f} s load / {REST:.0f} s rest, {RATE} ops/s",
            flush=True,
        )
        server = stack.enter_context(running("itemstream-soak", itemstream(2), env))
        samples = asyncio.run(soak(server.url, server.proc.pid))
    checks = verdict(samples, SECONDS)
    out = RESULTS / f"soak-{stamp}.json"
    out.write_text(
        json.dumps({"samples": [s.__dict__ for s in samples], "checks": checks}, indent=1)
    )
    picture = RESULTS / f"soak-{stamp}.png"
    plot(samples, picture)
    print("\nsoak targets (issue 27, target 5):")
    for what, figure, threshold, met in checks:
        print(f"  {what:<36}{figure:<36}{threshold:<18}{'met' if met else 'MISSED'}")
    print(f"\nJSON: {out}\nplot: {picture}")
    return 0 if all(met for *_, met in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
