"""Prometheus metrics, correct across gunicorn workers.

Under gunicorn, PROMETHEUS_MULTIPROC_DIR is set by `app.gunicorn_conf` before any worker
imports prometheus_client, wiped when the master starts, and dead workers are marked in
`child_exit`. Each scrape merges every worker's files into a fresh registry. Without the
variable (tests, `serve --reload`) one in-process registry per app is used."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, multiprocess
from prometheus_fastapi_instrumentator import Instrumentator

from app import __version__, build_revision

# Per-route buckets fine enough for p50/p99 panels and the latency SLO (0.5 s is one).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# prometheus-fastapi-instrumentator's defaults for the label-free histogram.
HIGHR_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 1.5)
HIGHR_BUCKETS += (2, 2.5, 3, 3.5, 4, 4.5, 5, 7.5, 10, 30, 60)
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class HttpMetrics:
    """The HTTP metrics of prometheus-fastapi-instrumentator's default set, with its names,
    labels and buckets (the dashboard, the alerts and users' queries use them), observed in
    one call per request by the edge layer with the route template Starlette resolved.
    Methods outside the standard ones are labelled `_OTHER`, so a client cannot grow the
    label set (as in OpenTelemetry's conventions)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.requests = Counter(
            "http_requests_total",
            "Total number of requests by method, status and handler.",
            ("method", "status", "handler"),
            registry=registry,
        )
        self.request_size = Summary(
            "http_request_size_bytes",
            "Content length of incoming requests by handler (from Content-Length).",
            ("handler",),
            registry=registry,
        )
        self.response_size = Summary(
            "http_response_size_bytes",
            "Content length of outgoing responses by handler (from Content-Length).",
            ("handler",),
            registry=registry,
        )
        self.duration_highr = Histogram(
            "http_request_duration_highr_seconds",
            "Latency with many buckets but no labels, for percentiles over all routes.",
            buckets=HIGHR_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "http_request_duration_seconds",
            "Latency by handler; for streaming responses the time to the first byte.",
            ("method", "handler"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        # Labelled children by (method, handler, status): `.labels()` validates and locks on
        # every call, a dict lookup does not. Bounded: templates x methods x status codes.
        self._children: dict[tuple[str, str, int], tuple[Any, Any, Any, Any]] = {}

    def observe(
        self,
        method: str,
        handler: str,
        status: int,
        seconds: float,
        request_bytes: int,
        response_bytes: int,
    ) -> None:
        if method not in KNOWN_METHODS:
            method = "_OTHER"
        key = (method, handler, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(method, str(status), handler),
                self.request_size.labels(handler),
                self.response_size.labels(handler),
                self.duration.labels(method, handler),
            )
        requests, request_size, response_size, duration = children
        requests.inc()
        request_size.observe(request_bytes)
        response_size.observe(response_bytes)
        self.duration_highr.observe(seconds)
        duration.observe(seconds)


class AppMetrics:
    """The service's own metrics. Gauges say how they combine across workers."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.http = HttpMetrics(registry)
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

        self.build_info = Gauge(
            "itemstream_build_info",
            "Always 1; the labels say which release runs (version) and from which commit "
            "(revision, baked into the image; unknown from a source tree)",
            ["version", "revision"],
            multiprocess_mode="max",
            registry=registry,
        )
        self.build_info.labels(__version__, build_revision()).set(1)
        self.event_loop_tasks = Gauge(
            "itemstream_event_loop_tasks",
            "asyncio tasks alive in the workers' event loops, sampled every second (all "
            "workers): back to its resting level between bursts, or something leaks",
            multiprocess_mode="livesum",
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

    def expect_provider(
        self, provider: str, outcomes: Iterable[str], error_kinds: Iterable[str]
    ) -> None:
        """Export the provider's series at zero before the first stream ends (Prometheus's
        advice for known label values): panels and alerts see 0, not "no data"."""
        self.stream_tokens.labels(provider)
        for outcome in outcomes:
            self.streams.labels(provider, outcome)
        for kind in error_kinds:
            self.upstream_errors.labels(provider, kind)

    # DatabaseObserver protocol (app.db.engine)
    def connection_acquired(self, seconds: float) -> None:
        self.db_pool_acquire.observe(seconds)

    def pool_checked_out(self, count: int) -> None:
        self.db_pool_checked_out.set(count)

    def database_unavailable(self) -> None:
        self.db_unavailable.inc()


def instrument(app: FastAPI, *, expose: bool) -> AppMetrics:
    """The app's metrics, and /metrics on the app's port when `expose`. The edge layer
    (app.api.edge) observes HTTP requests; prometheus-fastapi-instrumentator serves the scrape
    (merging every worker's files under gunicorn)."""
    # Per app, so several apps in one process (tests) do not collide. Under multiprocess mode
    # values go to the shared files whatever the registry, and /metrics reads those.
    registry = CollectorRegistry()
    if expose:
        Instrumentator(registry=registry).expose(app, endpoint="/metrics", include_in_schema=False)
    return AppMetrics(registry)


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
