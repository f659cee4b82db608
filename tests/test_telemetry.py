"""Telemetry of the real process model: gunicorn with two uvicorn workers on Postgres.

- Prometheus counters summed across workers are exact, and stay exact when a worker dies.
- Spans reach an OTLP/HTTP receiver: a server span with a database child span, the incoming
  traceparent honoured, and the trace id in the access log line.
- SIGTERM lets in-flight requests finish and exits 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import yaml

from harness.otlp import OtlpReceiver
from harness.pgbouncer import PgBouncer
from harness.postgres import PostgresServer
from harness.processes import free_port, wait_until
from harness.servers import ROOT, Server, pooled_env, serve
from tests.support.helm import render

pytestmark = pytest.mark.slow

SERVER_KIND, CLIENT_KIND = 2, 3  # OTLP SpanKind values
SIGNAL = "itemstream_http_requests_in_flight"  # what the custom-metric HPA scales on


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    otlp = OtlpReceiver().start()
    yield otlp
    otlp.close()


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
        if match is None:
            continue
        sample_labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(sample_labels.get(key) == value for key, value in labels.items()):
            total += float(match.group(2))
    return total


def logged_requests(server: Server, route: str | None = None) -> list[dict[str, Any]]:
    """The server's access log lines (for `route`, a template, if given)."""
    return [
        line
        for line in server.json_lines()
        if line.get("logger") == "itemstream.access"
        and (route is None or line["http"]["route"] == route)
    ]


def worker_pids(server: Server) -> set[int]:
    return {int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", server.output())}


async def hammer(base: str, paths: list[str]) -> list[int]:
    # No keep-alive: every request is a new connection, so the kernel spreads them over both
    # workers' accept queues.
    limits = httpx.Limits(max_keepalive_connections=0, max_connections=16)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=10) as client:
        responses = await asyncio.gather(*(client.get(path) for path in paths))
    return [response.status_code for response in responses]


def metrics_env(
    pg: PostgresServer, bouncer: PgBouncer, database: str, **extra: str
) -> tuple[dict[str, str], Callable[[], str]]:
    """The service's environment (through `bouncer`) with /metrics on a port of its own, and
    a scrape of that port."""
    port = free_port()
    env = pooled_env(pg, bouncer, database, METRICS_PORT=str(port), **extra)

    def scrape() -> str:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text

    return env, scrape


def test_metrics_are_exact_across_workers_and_survive_a_dead_worker(
    pg: PostgresServer, pgbouncer_modern: PgBouncer, schema_db: str
) -> None:
    env, scrape = metrics_env(pg, pgbouncer_modern, schema_db)
    with serve(env) as server:
        item = httpx.post(f"{server.base}/v1/items", json={"name": "m", "price": 1}).json()
        path = f"/v1/items/{item['id']}"
        first = 0
        for _ in range(4):  # the kernel picks the accepting worker; usually one round spreads
            assert asyncio.run(hammer(server.base, [path] * 50)) == [200] * 50
            first += 50
            served_by = {line["pid"] for line in logged_requests(server)}
            if len(served_by) == 2:
                break
        assert len(served_by) == 2, "both workers should have served requests"
        assert httpx.get(f"{server.base}/metrics").status_code == 404  # not on the app port
        labels = {"handler": "/v1/items/{item_id}", "method": "GET", "status": "200"}
        assert metric_sum(scrape(), "http_requests_total", **labels) == first

        victim = min(worker_pids(server))
        os.kill(victim, signal.SIGKILL)
        # Wait until the replacement has finished starting: a SIGTERM during a worker's boot
        # is lost (gunicorn's handler is not yet replaced) and shutdown would wait it out.
        assert wait_until(lambda: server.output().count("Application startup complete") == 3, 30), (
            server.output()[-2000:]
        )
        assert wait_until(lambda: httpx.get(f"{server.base}/livez").status_code == 200, 10)
        text = scrape()
        assert metric_sum(text, "http_requests_total", **labels) == first  # dead worker counted

        second = 60
        assert asyncio.run(hammer(server.base, [path] * second)) == [200] * second
        text = scrape()
        assert metric_sum(text, "http_requests_total", **labels) == first + second
        assert metric_sum(text, "itemstream_db_pool_acquire_seconds_count") >= first + second

        # At rest both gauges return to 0 (they drop just after the last responses went out).
        def at_rest() -> bool:
            now = scrape()
            return (
                metric_sum(now, "itemstream_http_requests_in_flight") == 0
                and metric_sum(now, "itemstream_db_pool_checked_out_connections") == 0
            )

        assert wait_until(at_rest, 5), scrape()
        # No stale per-pid gauge of the dead worker.
        assert f'pid="{victim}"' not in text


def test_spans_reach_otlp_with_db_children_and_log_correlation(
    pg: PostgresServer, pgbouncer_modern: PgBouncer, schema_db: str, receiver: OtlpReceiver
) -> None:
    env = pooled_env(
        pg,
        pgbouncer_modern,
        schema_db,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_SERVICE_NAME="itemstream-test",
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment.name=test",
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent_id = "00f067aa0ba902b7"
    with serve(env) as server:
        item = httpx.post(f"{server.base}/v1/items", json={"name": "t", "price": 1}).json()
        response = httpx.get(
            f"{server.base}/v1/items/{item['id']}",
            headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
        )
        assert response.status_code == 200
        httpx.get(f"{server.base}/readyz")  # excluded from tracing

        def server_span_arrived() -> bool:
            return any(s.trace_id == trace_id and s.kind == SERVER_KIND for s in receiver.spans)

        assert wait_until(server_span_arrived, 15), receiver.spans
        time.sleep(0.5)  # let the rest of the batch arrive
        access_lines = logged_requests(server, "/v1/items/{item_id}")
    request_span = next(
        s for s in receiver.spans if s.trace_id == trace_id and s.kind == SERVER_KIND
    )
    assert request_span.parent_span_id == parent_id  # incoming traceparent honoured
    assert request_span.name == "GET /v1/items/{item_id}"
    assert request_span.service == "itemstream-test"
    in_trace = [s for s in receiver.spans if s.trace_id == trace_id]
    db_spans = [
        s
        for s in in_trace
        if s.kind == CLIENT_KIND and s.attributes.get("db.system") == "postgresql"
    ]
    assert db_spans, in_trace
    assert all(s.parent_span_id == request_span.span_id for s in db_spans)
    assert all("traceparent" not in str(s.attributes.get("db.statement", "")) for s in db_spans)
    # No per-chunk send/receive spans, no spans for probes.
    assert not [s for s in in_trace if "http send" in s.name or "http receive" in s.name]
    assert not [s for s in receiver.spans if "readyz" in s.name]
    assert not [
        s for s in receiver.spans if "alembic_version" in str(s.attributes.get("db.statement"))
    ]
    # The access log line of that request carries its trace id.
    assert [line["trace_id"] for line in access_lines if line.get("trace_id") == trace_id]


def test_head_sampling_decides_once_and_unsampled_requests_keep_their_trace_id(
    pg: PostgresServer, pgbouncer_modern: PgBouncer, schema_db: str, receiver: OtlpReceiver
) -> None:
    """At a ratio of 0.5, each request is sampled or not once, at the edge: every sampled
    request has exactly one server span whose trace id is the one in its access log line (the
    SDK is not asked a second time with another trace id), unsampled ones create no span but
    still log a trace id and are counted; an unsampled incoming parent is followed."""
    env, scrape = metrics_env(
        pg,
        pgbouncer_modern,
        schema_db,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_TRACES_SAMPLER_ARG="0.5",
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    requests = 200
    unsampled_parent = "0af7651916cd43dd8448eb211c80319c"
    with serve(env) as server:
        item = httpx.post(f"{server.base}/v1/items", json={"name": "s", "price": 1}).json()
        path = f"/v1/items/{item['id']}"
        assert asyncio.run(hammer(server.base, [path] * requests)) == [200] * requests
        response = httpx.get(
            f"{server.base}{path}",
            headers={"traceparent": f"00-{unsampled_parent}-b7ad6b7169203331-00"},
        )
        assert response.status_code == 200
        time.sleep(1.0)  # let the last batch arrive
        logged = logged_requests(server, "/v1/items/{item_id}")
        scraped = scrape()
    labels = {"handler": "/v1/items/{item_id}", "method": "GET", "status": "200"}
    assert metric_sum(scraped, "http_requests_total", **labels) == requests + 1
    assert len(logged) == requests + 1
    assert all(re.fullmatch("[0-9a-f]{32}", line.get("trace_id", "")) for line in logged)
    assert len({line["trace_id"] for line in logged}) == requests + 1  # one trace per request
    server_spans = [
        s for s in receiver.spans if s.kind == SERVER_KIND and s.name == "GET /v1/items/{item_id}"
    ]
    span_traces = [s.trace_id for s in server_spans]
    assert len(span_traces) == len(set(span_traces))
    # Every span belongs to a logged request. At p = 0.5 over 200 requests, outside 70..130
    # has a probability of about 3e-5; asking the sampler twice (with two trace ids) would
    # keep a quarter, 50 +- 6.
    assert set(span_traces) <= {line["trace_id"] for line in logged}
    assert 70 <= len(server_spans) <= 130, len(server_spans)
    # Database spans exist only under sampled requests.
    db_traces = {
        s.trace_id
        for s in receiver.spans
        if s.kind == CLIENT_KIND and s.attributes.get("db.system") == "postgresql"
    }
    all_server_traces = {s.trace_id for s in receiver.spans if s.kind == SERVER_KIND}
    assert db_traces and db_traces <= all_server_traces
    # The caller said "not sampled": no span, and the log line carries the caller's trace id.
    assert unsampled_parent not in {s.trace_id for s in receiver.spans}
    assert unsampled_parent in {line["trace_id"] for line in logged}


def test_sigterm_lets_in_flight_requests_finish(
    pg: PostgresServer, pgbouncer_modern: PgBouncer, schema_db: str
) -> None:
    env = pooled_env(pg, pgbouncer_modern, schema_db, WEB_CONCURRENCY="1")
    with serve(env) as server:
        port = int(server.base.rsplit(":", 1)[1])
        body = b'{"name": "in flight", "price": 4}'
        # A request whose body is still arriving when SIGTERM comes.
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(
            b"POST /v1/items HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert server.proc.poll() is None, "exited with a request in flight"
        sock.sendall(body[10:])
        sock.settimeout(10)
        reply = sock.recv(65536).decode()
        sock.close()
        assert reply.startswith("HTTP/1.1 201"), reply
        server.proc.wait(30)
        assert server.proc.returncode == 0, server.output()[-3000:]
        lines = server.json_lines()
        assert any("Shutting down" in line.get("msg", "") for line in lines)


class _FakeUpstream(ThreadingHTTPServer):
    """A minimal OpenAI-compatible upstream in a thread: three tokens, then [DONE]."""

    def __init__(self) -> None:
        self.traceparents: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                outer.traceparents.append(self.headers.get("traceparent", ""))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                for index in range(3):
                    chunk = {"choices": [{"index": 0, "delta": {"content": f"t{index} "}}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(0.02)
                final = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
                self.wfile.write(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


def test_stream_span_has_first_token_event_and_upstream_http_child(
    pg: PostgresServer, pgbouncer_modern: PgBouncer, schema_db: str, receiver: OtlpReceiver
) -> None:
    upstream = _FakeUpstream()
    env = pooled_env(
        pg,
        pgbouncer_modern,
        schema_db,
        WEB_CONCURRENCY="1",
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_BSP_SCHEDULE_DELAY="100",
        LLM_PROVIDER="openai",
        LLM_BASE_URL=upstream.url,
    )
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4737"
    try:
        with serve(env) as server:
            response = httpx.post(
                f"{server.base}/v1/chat/completions",
                json={"model": "itemstream-mock", "messages": [{"role": "user", "content": "hi"}]},
                headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b8-01"},
            )
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"] == "t0 t1 t2 "

            def stream_span_arrived() -> bool:
                return any(s.name == "chat itemstream-mock" for s in receiver.spans)

            assert wait_until(stream_span_arrived, 15), receiver.spans
            time.sleep(0.5)
    finally:
        upstream.shutdown()
    in_trace = {s.span_id: s for s in receiver.spans if s.trace_id == trace_id}
    request = next(s for s in in_trace.values() if s.kind == SERVER_KIND)
    stream = next(s for s in in_trace.values() if s.name == "chat itemstream-mock")
    assert stream.parent_span_id == request.span_id
    assert stream.attributes["gen_ai.usage.output_tokens"] == 3
    assert stream.attributes["itemstream.generation.outcome"] == "completed"
    # The end of the upstream stream (StopAsyncIteration) is not an error.
    assert stream.events == ["gen_ai.first_token"], stream.events
    http_spans = [s for s in in_trace.values() if s.parent_span_id == stream.span_id]
    assert [s.name for s in http_spans] == ["POST"], http_spans
    # The upstream got the trace context of its HTTP client span.
    assert upstream.traceparents[0].split("-")[1:3] == [trace_id, http_spans[0].span_id]


def test_sigterm_ends_open_streams_with_a_final_event(
    pg: PostgresServer, pgbouncer_modern: PgBouncer, schema_db: str
) -> None:
    env = pooled_env(
        pg,
        pgbouncer_modern,
        schema_db,
        WEB_CONCURRENCY="1",
        MOCK_TOKENS="400",
        MOCK_TOKEN_DELAY="0.05",
        STREAM_DRAIN_SECONDS="2",
    )
    results: dict[str, list[str]] = {}

    def read(name: str, base: str, max_tokens: int) -> None:
        body = {
            "model": "itemstream-mock",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "max_tokens": max_tokens,
        }
        lines = results.setdefault(name, [])
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as r:
            lines.extend(line for line in r.iter_lines() if line.startswith("data:"))

    with serve(env) as server:
        # Short: 30 tokens (1.5 s) ends inside the drain period. Long: 20 s does not.
        threads = [
            threading.Thread(target=read, args=("short", server.base, 30)),
            threading.Thread(target=read, args=("long", server.base, 400)),
        ]
        for thread in threads:
            thread.start()
        assert wait_until(
            lambda: len(results) == 2 and all(len(v) >= 3 for v in results.values()), 10
        )
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(30)
        assert server.proc.wait(30) == 0, server.output()[-3000:]
        took = time.monotonic() - signalled
    assert results["short"][-1] == "data: [DONE]"
    last = json.loads(results["long"][-1].removeprefix("data: "))
    assert "shut down" in last["error"]["message"], results["long"][-3:]
    assert took < 10, f"shutdown took {took:.1f}s"


def test_the_autoscaling_metric_counts_open_streams_across_workers(
    pg: PostgresServer, pgbouncer_modern: PgBouncer, schema_db: str
) -> None:
    """Streams are long and cheap in CPU: the chart's custom-metric HPA path scales on the
    in-flight gauge, which must count every open stream of every worker, and the adapter rule
    and the HPA must name the metric the service exports."""
    hpa = render(None, "autoscaling.inFlightRequests.enabled=true").one(
        "HorizontalPodAutoscaler", "api"
    )
    (pods,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    adapter = yaml.safe_load((ROOT / "k8s" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert pods["metric"]["name"] == rule["name"]["as"] == SIGNAL
    assert rule["seriesQuery"].startswith(SIGNAL + "{")

    env, scrape = metrics_env(
        pg,
        pgbouncer_modern,
        schema_db,
        MOCK_TOKENS="200",
        MOCK_TOKEN_DELAY="0.05",
    )
    open_streams = 12
    with serve(env) as server:

        async def hold() -> tuple[float, float]:
            limits = httpx.Limits(max_keepalive_connections=0, max_connections=open_streams)
            async with httpx.AsyncClient(base_url=server.base, limits=limits, timeout=30) as c:
                first = asyncio.Event()
                opened = 0

                async def stream() -> None:
                    nonlocal opened
                    body = {
                        "model": "itemstream-mock",
                        "stream": True,
                        "messages": [{"role": "user", "content": "x"}],
                    }
                    async with c.stream("POST", "/v1/chat/completions", json=body) as response:
                        async for _ in response.aiter_lines():
                            opened += 1
                            if opened >= open_streams:
                                first.set()
                            await asyncio.sleep(30)  # hold it open, reading nothing more

                tasks = [asyncio.create_task(stream()) for _ in range(open_streams)]
                await asyncio.wait_for(first.wait(), 15)
                await asyncio.sleep(0.5)
                text = await asyncio.to_thread(scrape)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                return metric_sum(text, SIGNAL), metric_sum(text, "itemstream_streams_active")

        in_flight, active = asyncio.run(hold())
        assert in_flight == open_streams, in_flight
        assert active == open_streams
        # Closed streams leave the gauge (the HPA must see load go away too).
        assert wait_until(lambda: metric_sum(scrape(), SIGNAL) == 0, 10), scrape()
