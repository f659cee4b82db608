"""Redis fails over under load: the rate limiter's primary is killed (SIGKILL) and the
Sentinels (harness/sentinel.py: Debian's redis-server and redis-sentinel, three Sentinels,
quorum 2) promote its replica. The app, as production runs it (gunicorn, 2 workers,
PgBouncer, REDIS_URL naming the Sentinels), serves keyed writers, readers and generations
from a new caller address on every request, while a probe asks every half second, as a new
caller, for LIMIT + EXTRA requests at once:

- before the kill, every probe gets exactly LIMIT of them (the limit is shared by both
  workers through Redis);
- while there is no primary, the configured fail mode holds: `open` serves every request
  (never a 5xx), `closed` answers 503 + Retry-After;
- after the promotion, decisions are exact again within the breaker's period and stay so;
- the load sees only 2xx (and 503 + Retry-After when closed), each request answered within
  its bound, the generations complete with the stored text equal to the received, and no
  worker restarts.

A caller's counts written to the old primary and not yet replicated are lost with it (Redis
replicates asynchronously), so exactness is asserted for callers that start after the
promotion: the ones that matter for the next window."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import asyncpg
import httpx
import pytest

from harness import sentinel
from harness.pgbouncer import PgBouncer
from harness.postgres import PostgresServer
from harness.sentinel import SentinelRig
from harness.servers import Server, production_env, serve
from tests.support.app import migrated_database
from tests.support.load import Load, slowest_answered, unexplained_errors
from tests.support.skips import missing

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture(scope="module")
def database(pg: PostgresServer) -> Iterator[str]:
    yield from migrated_database(pg, "itemstream_redis_failover")


LIMIT = 20  # requests per caller per hour: nothing refills during the test
EXTRA = 5
BREAKER_SECONDS = 5.0  # the default RATE_LIMIT_BREAKER_SECONDS
_addresses = (f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}" for i in itertools.count(1))


def _caller() -> dict[str, str]:
    """A new caller: the limiter counts anonymous callers by address, and believes
    X-Forwarded-For from FORWARDED_ALLOW_IPS."""
    return {"X-Forwarded-For": next(_addresses)}


@dataclass
class Probe:
    started: float
    statuses: list[int]

    @property
    def served(self) -> int:
        return sum(1 for status in self.statuses if status == 200)

    @property
    def exact(self) -> bool:
        return self.served == LIMIT and self.statuses.count(429) == EXTRA


@dataclass
class Probes:
    base: str
    done: list[Probe] = field(default_factory=list)
    stopping: bool = False

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=self.base, timeout=10) as client:
            while not self.stopping:
                headers, started = _caller(), time.monotonic()
                answers = await asyncio.gather(
                    *(
                        client.get("/v1/items?per_page=1", headers=headers)
                        for _ in range(LIMIT + EXTRA)
                    ),
                    return_exceptions=True,
                )
                statuses = [a.status_code if isinstance(a, httpx.Response) else 0 for a in answers]
                for answer in answers:
                    if isinstance(answer, httpx.Response) and answer.status_code == 503:
                        assert answer.headers.get("retry-after"), answer.text
                self.done.append(Probe(started, statuses))
                await asyncio.sleep(0.5)


def _service(
    rig: SentinelRig, pg: PostgresServer, bouncer: PgBouncer, database: str, mode: str
) -> AbstractContextManager[Server]:
    return serve(
        production_env(
            pg,
            bouncer,
            database,
            RATE_LIMIT_ENABLED="true",
            REDIS_URL=rig.url(),
            RATE_LIMIT_REQUESTS=str(LIMIT),
            RATE_LIMIT_WINDOW_SECONDS="3600",
            RATE_LIMIT_FAIL_MODE=mode,
            RATE_LIMIT_BREAKER_SECONDS=str(BREAKER_SECONDS),
            FORWARDED_ALLOW_IPS="127.0.0.1",
            MOCK_TOKENS="200",
            MOCK_TOKEN_DELAY="0.05",
        )
    )


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_rate_limits_survive_a_redis_failover(
    mode: str, pg: PostgresServer, pgbouncer_modern: PgBouncer, database: str
) -> None:
    why = sentinel.available()
    if why is not None:
        missing(why)
    with SentinelRig() as rig, _service(rig, pg, pgbouncer_modern, database, mode) as server:
        boots = server.output().count("Booting worker")
        probes = Probes(server.base)
        moments: dict[str, float] = {}
        lost: list[int] = []

        async def script() -> None:
            await asyncio.sleep(3)
            moments["kill"] = time.monotonic()
            lost.append(await asyncio.to_thread(rig.kill_primary))
            while not await asyncio.to_thread(rig.promoted, lost[0]):
                await asyncio.sleep(0.1)
            moments["promoted"] = time.monotonic()
            await asyncio.sleep(BREAKER_SECONDS + 5)
            probes.stopping = True

        load = Load(server.base, writers=8, readers=4, generations=4, generation_tokens=200)
        load.headers = _caller
        probing = asyncio.create_task(probes.run())
        await load.run(script())
        await probing
        _report(mode, load, probes, moments, server)
        _check(mode, load, probes, moments, server, boots)
        for stream in load.streams:
            assert stream.status == "completed", stream
            assert await _stored_output(pg, database, stream.generation_id) == stream.received


def _report(
    mode: str, load: Load, probes: Probes, moments: dict[str, float], server: Server
) -> None:
    kill, promoted = moments["kill"], moments["promoted"]
    exact_again = _exact_again(probes, kill)
    line = " ".join(
        f"{p.started - kill:+.1f}s:{p.served}/{p.statuses.count(429)}"
        + (f"/503x{p.statuses.count(503)}" if 503 in p.statuses else "")
        for p in probes.done
    )
    print(
        f"\nredis failover [fail {mode}]: promoted {promoted - kill:.1f} s after the kill, "
        f"decisions exact again {exact_again - kill:.1f} s after it "
        f"({exact_again - promoted:.1f} s after the promotion); {len(load.outcomes)} requests "
        f"of the load, statuses {sorted({o.status for o in load.outcomes})}, slowest "
        f"{slowest_answered(server.output()):.3f} s by the service's clock"
    )
    print(f"  probes (start: served/429 of {LIMIT + EXTRA}, limit {LIMIT}): {line}")


def _exact_again(probes: Probes, kill: float) -> float:
    """When the first probe of the final run of exact ones started (after the kill)."""
    since = float("inf")
    for probe in reversed(probes.done):
        if not probe.exact or probe.started < kill:
            break
        since = probe.started
    return since


def _check(
    mode: str,
    load: Load,
    probes: Probes,
    moments: dict[str, float],
    server: Server,
    boots: int,
) -> None:
    kill, promoted = moments["kill"], moments["promoted"]
    # The first probe is not judged: its 25 concurrent requests grow each worker's Redis
    # pool, every new connection asks a Sentinel first, and one later than
    # RATE_LIMIT_REDIS_TIMEOUT fails open as documented (CI served 25 of 25 there once).
    before = [p for p in probes.done[1:] if p.started + 1 < kill]
    assert before and all(p.exact for p in before), [p.statuses for p in before]
    assert _exact_again(probes, kill) <= promoted + BREAKER_SECONDS + 2, "not exact again"
    for probe in probes.done:
        statuses = set(probe.statuses)
        if mode == "open":
            # Never a 5xx, and never more refused than an exact limiter would refuse.
            assert statuses <= {200, 429} and probe.served >= LIMIT, probe
        else:
            assert statuses <= {200, 429, 503}, probe
    problems = unexplained_errors(load, 0.5)
    assert not problems, (problems, server.output()[-3000:])
    if mode == "open":
        assert all(o.ok for o in load.outcomes), "fail open serves every request"
    else:
        assert any(o.status == 503 for o in load.outcomes), "fail closed refuses without Redis"
    # Each call to Redis or a Sentinel is bounded by RATE_LIMIT_REDIS_TIMEOUT (50 ms).
    assert slowest_answered(server.output()) < 1.0, slowest_answered(server.output())
    assert server.output().count("Booting worker") == boots, "a worker restarted"


async def _stored_output(pg: PostgresServer, database: str, generation_id: str) -> str | None:
    conn = await asyncpg.connect(host="127.0.0.1", port=pg.port, user="postgres", database=database)
    try:
        output: str | None = await conn.fetchval(
            "SELECT output FROM generations WHERE id = $1::uuid", generation_id
        )
        return output
    finally:
        await conn.close()
