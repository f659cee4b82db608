"""Prometheus metrics, correct across gunicorn workers.

Under gunicorn, PROMETHEUS_MULTIPROC_DIR is set by `app.gunicorn_conf` before any worker
imports prometheus_client, wiped when the master starts, and dead workers are marked in
`child_exit`. Each scrape merges every worker's files into a fresh registry. Without the
variable (tests, `serve --reload`) one in-process registry per app is used."""

from __future__ import annotations

import shutil
from pathlib import Path

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_fastapi_instrumentator import Instrumentator
from starlette.types import ASGIApp, Receive, Scope, Send

from app.probes import PROBE_PATHS

NOT_INSTRUMENTED = sorted(PROBE_PATHS)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class AppMetrics:
    """The service's own metrics. Gauges say how they combine across workers."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.requests_in_flight = Gauge(
            "itemstream_http_requests_in_flight",
            "HTTP requests being handled, streams included (all workers)",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.db_pool_checked_out = Gauge(
            "itemstream_db_pool_checked_out_connections",
            "Database connections checked out of the app's pools (all workers)",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.db_pool_acquire = Histogram(
            "itemstream_db_pool_acquire_seconds",
            "Time a unit of work waited for a database connection",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        )
        self.db_unavailable = Counter(
            "itemstream_db_unavailable",
            "Units of work that failed because the database or pooler was unreachable",
            registry=registry,
        )

        self.streams_active = Gauge(
            "itemstream_streams_active",
            "Token streams being served (all workers)",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.streams = Counter(
            "itemstream_streams",
            "Token streams ended, by outcome (completed, cancelled, failed)",
            ["provider", "outcome"],
            registry=registry,
        )
        self.stream_tokens = Counter(
            "itemstream_stream_tokens",
            "Tokens streamed to clients",
            ["provider"],
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "itemstream_stream_time_to_first_token_seconds",
            "Time from the start of a stream to its first token",
            ["provider"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60),
            registry=registry,
        )
        self.upstream_errors = Counter(
            "itemstream_upstream_errors",
            "LLM upstream failures, by kind (rate_limited, timeout, rejected, unavailable)",
            ["provider", "kind"],
            registry=registry,
        )

        self.ratelimit_backend_errors = Counter(
            "itemstream_ratelimit_backend_errors",
            "Rate limit checks that could not reach Redis (served or refused per the fail mode)",
            registry=registry,
        )

    def ratelimit_backend_error(self) -> None:
        self.ratelimit_backend_errors.inc()

    # GenerationObserver protocol (app.services.generations)
    def stream_started(self, provider: str) -> None:
        self.streams_active.inc()

    def first_token(self, provider: str, seconds: float) -> None:
        self.time_to_first_token.labels(provider).observe(seconds)

    def stream_finished(self, provider: str, outcome: str, tokens: int) -> None:
        self.streams_active.dec()
        self.streams.labels(provider, outcome).inc()
        if tokens:
            self.stream_tokens.labels(provider).inc(tokens)

    def upstream_error(self, provider: str, kind: str) -> None:
        self.upstream_errors.labels(provider, kind).inc()

    # DatabaseObserver protocol (app.db.engine)
    def connection_acquired(self, seconds: float) -> None:
        self.db_pool_acquire.observe(seconds)

    def pool_checked_out(self, count: int) -> None:
        self.db_pool_checked_out.set(count)

    def database_unavailable(self) -> None:
        self.db_unavailable.inc()


def instrument(app: FastAPI, *, expose: bool) -> AppMetrics:
    """Add the HTTP metrics middleware (must happen before the app starts) and /metrics."""
    # Per app, so several apps in one process (tests) do not collide. Under multiprocess mode
    # values go to the shared files whatever the registry, and /metrics reads those.
    registry = CollectorRegistry()
    instrumentator = Instrumentator(
        should_group_status_codes=False,
        # Its in-progress gauge ignores `registry` (always the global one); ours is below.
        should_instrument_requests_inprogress=False,
        # Long streams would otherwise dominate the latency histogram: record time to the
        # first byte for streaming responses.
        should_exclude_streaming_duration=True,
        excluded_handlers=NOT_INSTRUMENTED,
        registry=registry,
    )
    # Per-route buckets fine enough for p50/p99 panels and the latency SLO (0.5 s is one).
    instrumentator.instrument(app, latency_lowr_buckets=LATENCY_BUCKETS)
    if expose:
        instrumentator.expose(app, endpoint="/metrics", include_in_schema=False)
    metrics = AppMetrics(registry)
    app.add_middleware(InFlightRequests, gauge=metrics.requests_in_flight)
    return metrics


class InFlightRequests:
    """Pure ASGI: counts requests being handled (streams included): the HPA's Pods metric."""

    def __init__(self, app: ASGIApp, gauge: Gauge) -> None:
        self.app = app
        self.gauge = gauge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in NOT_INSTRUMENTED:
            await self.app(scope, receive, send)
            return
        self.gauge.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.gauge.dec()


def scrape_registry() -> CollectorRegistry:
    """A fresh registry that merges all workers' files (never register metrics into it)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def prepare_multiprocess_dir(path: str) -> None:
    """Wipe leftovers of earlier runs: a restarted container can reuse PIDs and would
    otherwise continue from stale counter files."""
    directory = Path(path)
    if directory.exists():
        for child in directory.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    directory.mkdir(parents=True, exist_ok=True)


def start_metrics_server(port: int, host: str) -> None:
    """Serve the merged per-worker files on their own port, from a process that serves no
    requests (gunicorn's master, or the reloader in `serve --reload`)."""
    from prometheus_client import start_http_server

    start_http_server(port, host, registry=scrape_registry())


def mark_worker_dead(pid: int) -> None:
    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
