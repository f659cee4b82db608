"""Clients that hold resources, against gunicorn with two workers on PostgreSQL through
PgBouncer: slow headers (slowloris), slow bodies, oversized headers, and a Redis that accepts
connections and never answers. Bounded in count and time; all on loopback."""

from __future__ import annotations

import asyncio
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from harness.pgbouncer import PgBouncer
from harness.postgres import PostgresServer
from harness.processes import memory_kib, wait_until, worker_pids
from harness.servers import Server, production_env, serve
from tests.support.app import migrated_database

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

HEADER_TIMEOUT = 4.0
BODY_TIMEOUT = 4.0
SLOW_HEADERS = 200
SLOW_BODIES = 50


@pytest.fixture(scope="module")
def database(pg: PostgresServer) -> Iterator[str]:
    yield from migrated_database(pg, "itemstream_slow")


def _service_env(
    pg: PostgresServer, bouncer: PgBouncer, database: str, **extra: str
) -> dict[str, str]:
    return production_env(
        pg,
        bouncer,
        database,
        HTTP_HEADER_TIMEOUT=str(HEADER_TIMEOUT),
        HTTP_BODY_TIMEOUT=str(BODY_TIMEOUT),
        **extra,
    )


def _rss_mib(server: Server, field: str = "VmRSS") -> list[float]:
    """Each worker's memory now (VmRSS), or its peak so far (VmHWM)."""
    return [memory_kib(pid, field) / 1024 for pid in worker_pids(server.proc.pid)]


def _grew_at_most(server: Server, before: list[float], mib: float) -> None:
    """Neither now nor at its peak during the test has a worker held `mib` more than before
    (memory read and let go in between shows only in the peak)."""
    for now, peak, then in zip(_rss_mib(server), _rss_mib(server, "VmHWM"), before, strict=True):
        assert now <= then + mib, f"a worker holds {now - then:.1f} MiB more"
        assert peak <= then + mib, f"a worker peaked at {peak - then:.1f} MiB more"


def _port(server: Server) -> int:
    return int(server.base.rsplit(":", 1)[1])


@dataclass
class Slow:
    """One slow connection: when it opened, when the server closed it, and what it said."""

    opened: float = 0.0
    closed: float | None = None
    answer: bytes = b""
    headers_done: float | None = None


async def _slow_headers(port: int, record: Slow, stop_at: float) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    record.opened = time.monotonic()
    writer.write(b"GET /v1/items HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    await _dribble(reader, writer, record, stop_at)


async def _slow_body(port: int, record: Slow, stop_at: float) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    record.opened = time.monotonic()
    writer.write(
        b"POST /v1/items HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{"
    )
    record.headers_done = time.monotonic()
    await _dribble(reader, writer, record, stop_at)


async def _dribble(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: Slow, stop_at: float
) -> None:
    """One byte a second until the server closes the connection (or the test gives up)."""
    try:
        while time.monotonic() < stop_at:
            try:
                record.answer += await asyncio.wait_for(reader.read(4096), 1.0)
                if reader.at_eof():
                    record.closed = time.monotonic()
                    return
            except TimeoutError:
                pass
            writer.write(b"a")
            await writer.drain()
    except (ConnectionError, OSError):
        record.closed = time.monotonic()
    finally:
        writer.close()


def _normal_client(base: str, item: str, stop: threading.Event, latencies: list[float]) -> None:
    with httpx.Client(base_url=base, timeout=10) as client:
        while not stop.is_set():
            started = time.monotonic()
            assert client.get(f"/v1/items/{item}").status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.01)


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def test_slow_headers_and_bodies_are_dropped_while_others_are_served(
    pg: PostgresServer, pgbouncer_modern: PgBouncer, database: str
) -> None:
    with serve(_service_env(pg, pgbouncer_modern, database)) as server:
        item = httpx.post(f"{server.base}/v1/items", json={"name": "x", "price": 1}).json()["id"]
        for _ in range(200):  # warm both workers up
            httpx.get(f"{server.base}/v1/items/{item}")
        before = [
            max(now, peak)
            for now, peak in zip(_rss_mib(server), _rss_mib(server, "VmHWM"), strict=True)
        ]
        latencies: list[float] = []
        stop = threading.Event()
        normal = threading.Thread(
            target=_normal_client, args=(server.base, item, stop, latencies), daemon=True
        )
        heads = [Slow() for _ in range(SLOW_HEADERS)]
        bodies = [Slow() for _ in range(SLOW_BODIES)]

        async def attack() -> None:
            stop_at = time.monotonic() + 20
            await asyncio.gather(
                *(_slow_headers(_port(server), r, stop_at) for r in heads),
                *(_slow_body(_port(server), r, stop_at) for r in bodies),
            )

        normal.start()
        asyncio.run(attack())
        stop.set()
        normal.join(15)
        after = _rss_mib(server)
        held = [time.monotonic() - r.opened for r in heads if r.closed is None]
        header_times = sorted(r.closed - r.opened for r in heads if r.closed is not None)
        body_times = sorted(
            r.closed - r.headers_done for r in bodies if r.closed and r.headers_done
        )
        print(
            f"slow headers closed after {header_times[0]:.1f}-{header_times[-1]:.1f}s "
            f"(timeout {HEADER_TIMEOUT}s), slow bodies after {body_times[0]:.1f}-"
            f"{body_times[-1]:.1f}s (timeout {BODY_TIMEOUT}s); normal client p99 "
            f"{_p99(latencies) * 1000:.1f} ms over {len(latencies)} requests; worker RSS "
            f"{[round(b, 1) for b in before]} -> {[round(a, 1) for a in after]} MiB"
        )
        assert not held, f"{len(held)} slow-header connections never closed"
        assert len(header_times) == SLOW_HEADERS and len(body_times) == SLOW_BODIES
        assert header_times[-1] <= HEADER_TIMEOUT + 2.0
        assert body_times[-1] <= BODY_TIMEOUT + 2.0
        assert all(r.answer.startswith(b"HTTP/1.1 408") for r in heads), heads[0].answer[:100]
        assert _p99(latencies) < 0.1, f"p99 {_p99(latencies) * 1000:.0f} ms"
        _grew_at_most(server, before, 10)


def test_oversized_headers_hold_no_memory(
    pg: PostgresServer, pgbouncer_modern: PgBouncer, database: str
) -> None:
    """Ten connections each sending a 10 MiB header line: each refused once past the limit,
    the workers' memory as it was."""
    with serve(_service_env(pg, pgbouncer_modern, database)) as server:
        for _ in range(100):
            httpx.get(f"{server.base}/livez")
        before = [
            max(now, peak)
            for now, peak in zip(_rss_mib(server), _rss_mib(server, "VmHWM"), strict=True)
        ]
        answers: list[bytes] = []

        def flood() -> None:
            with socket.create_connection(("127.0.0.1", _port(server))) as sock:
                sock.sendall(b"GET /v1/items HTTP/1.1\r\nHost: x\r\nX-Big: ")
                try:
                    for _ in range(160):
                        sock.sendall(b"a" * 65536)
                except OSError:
                    pass
                sock.settimeout(5)
                try:
                    answers.append(sock.recv(200))
                except OSError:
                    answers.append(b"")

        threads = [threading.Thread(target=flood) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        after = _rss_mib(server)
        print(f"worker RSS {before} -> {after} MiB; answers {[a[:12] for a in answers]}")
        assert all(not a or a.startswith(b"HTTP/1.1 431") for a in answers), answers
        _grew_at_most(server, before, 10)
        # The limits do not get in the way of an ordinary request.
        assert httpx.get(f"{server.base}/v1/items").status_code == 200


@dataclass
class HungRedis:
    """Accepts connections and never answers (a Redis stuck in a long command, a half-dead
    network path)."""

    port: int = 0
    connections: list[socket.socket] = field(default_factory=list)

    def start(self) -> HungRedis:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(512)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self.connections.append(connection)

    def close(self) -> None:
        self._listener.close()
        for connection in self.connections:
            connection.close()


def test_a_hung_redis_costs_a_few_timeouts_per_breaker_period(
    pg: PostgresServer, pgbouncer_modern: PgBouncer, database: str
) -> None:
    redis = HungRedis().start()
    timeout = 0.05
    env = _service_env(
        pg,
        pgbouncer_modern,
        database,
        RATE_LIMIT_ENABLED="true",
        REDIS_URL=f"redis://127.0.0.1:{redis.port}/0",
        RATE_LIMIT_REDIS_TIMEOUT=str(timeout),
        RATE_LIMIT_BREAKER_SECONDS="5",
        WEB_CONCURRENCY="1",
    )
    try:
        with serve(env) as server, httpx.Client(base_url=server.base) as client:
            first = time.monotonic()
            for _ in range(3):  # the breaker opens after three failures in a row
                assert client.get("/v1/items").status_code == 200  # fail open: served
            first = time.monotonic() - first
            latencies = []
            started = time.monotonic()
            while time.monotonic() - started < 3:  # inside one breaker period
                begun = time.monotonic()
                assert client.get("/v1/items").status_code == 200
                latencies.append(time.monotonic() - begun)
            p99 = _p99(latencies)
            print(
                f"first three requests {first * 1000:.0f} ms (a Redis timeout of "
                f"{timeout * 1000:.0f} ms each), then p99 {p99 * 1000:.1f} ms over "
                f"{len(latencies)} requests"
            )
            assert first >= 3 * timeout
            assert p99 <= timeout + 0.02, f"p99 {p99 * 1000:.0f} ms"
            metrics = client.get("/metrics").text
            assert "itemstream_ratelimit_backend_errors_total" in metrics
            assert wait_until(lambda: "rate limit backend unavailable" in server.output(), 5)
    finally:
        redis.close()
