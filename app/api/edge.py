"""The outermost layer: what every request pays for observability and hardening, in one pass.

Per request it counts the request in flight, takes the head sampling decision (once, before
any span exists), and when the response starts adds the hardening headers; when it ends it
observes the HTTP metrics with the route template Starlette already resolved and writes the
access log line under the request's trace id. Only sampled requests go through the
OpenTelemetry middleware (full server span and database spans, with the caller's context);
the others run the same stack without it, under a non-recording span that carries the trace
id into logs and outgoing calls. Probes and scrapes are neither counted, traced nor logged
at INFO. A request whose client left before any answer is counted and logged as 499 (nginx's
convention), not as a server error.

It replaces the two maintained layers that do this (prometheus-fastapi-instrumentator's
middleware, kept only to serve /metrics, and the OpenTelemetry ASGI middleware around every
request) for a measured reason: `make bench`, get by id through PgBouncer, 2 workers, 64
connections (2026-12-04): 3,313 requests/s for the service against 2,762 for bare FastAPI with
those two layers (1.2x), though the service also authenticates, rate limits and sends ETags;
tracing every request costs about a third (docs/benchmarks.md). Its bookkeeping is proven by
tests/properties/test_edge.py."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from time import perf_counter

from fastapi import FastAPI
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.middleware import HardeningHeaders, route_path
from app.lifecycle import CLIENT_GONE
from app.probes import PROBE_PATHS
from app.telemetry.access import log_request
from app.telemetry.metrics import AppMetrics
from app.telemetry.tracing import HeadSampler, RequestTrace, without_tracing

# nginx's "client closed request": what a request is counted and logged as when its client
# went away before any answer was sent.
CLIENT_CLOSED = 499


class Edge:
    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: AppMetrics | None,
        sampler: HeadSampler | None,
        headers: HardeningHeaders | None,
        routes: Sequence[BaseRoute] = (),
    ) -> None:
        self.app = app
        # The app's routes, to name a request no API route matched (the docs pages, their
        # assets, the OpenAPI document) by the route that served it, as the instrumentator does.
        self.routes = routes
        # Without the OpenTelemetry middleware in the stack there is nothing to sample for.
        self.untraced = without_tracing(app) if sampler is not None else None
        self.sampler = sampler if self.untraced is not None else None
        self.metrics = metrics
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        quiet = path in PROBE_PATHS
        exchange = _Exchange(send, self.headers.for_path(path) if self.headers else None)
        exchange.method = scope["method"]  # before HeadAsGet turns a HEAD into a GET
        app = self.app
        in_flight = self.metrics.requests_in_flight if self.metrics and not quiet else None
        if in_flight is not None:
            in_flight.inc()
        if quiet:
            app = self.untraced or app
        elif self.sampler is not None:
            exchange.trace = self.sampler.begin(scope["headers"])
            if not exchange.trace.sampled:
                app = self.untraced or app
        exchange.receive_from = receive
        try:
            await app(scope, exchange.receive, exchange.send)
        except asyncio.CancelledError:
            if not scope.get(CLIENT_GONE):
                raise
            # The server cancelled the request because its client left (app.protocol): the
            # request ends here, and the worker goes on.
            exchange.gone = True
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        finally:
            if in_flight is not None:
                in_flight.dec()
            self._finish(scope, exchange, quiet)

    def _served_by(self, scope: Scope) -> str | None:
        """The template of the plain route or mount that served a request outside the API."""
        # A mount moved the root path down to itself; match from where the app saw it.
        scope = {**scope, "root_path": scope.get("app_root_path", scope.get("root_path", ""))}
        for route in self.routes:
            if isinstance(route, Route | Mount) and route.matches(scope)[0] == Match.FULL:
                return f"{route.path}/{{path}}" if isinstance(route, Mount) else route.path
        return None

    def _finish(self, scope: Scope, exchange: _Exchange, quiet: bool) -> None:
        ended = perf_counter()
        if not exchange.first_byte and exchange.gone:
            # The client left before any answer (a closed tab, a stream given up before its
            # first token): nginx's 499, not a server error for the 5xx alerts.
            exchange.status = CLIENT_CLOSED
        template: str | None = getattr(scope.get("route"), "path", None)
        if template is None and exchange.status != 404:
            template = self._served_by(scope)
        if self.metrics is not None and not quiet:
            # Streams are timed to their first byte: their length is the client's.
            self.metrics.http.observe(
                exchange.method,
                template or "none",
                exchange.status,
                (exchange.first_byte or ended) - exchange.started,
                _content_length(scope["headers"]),
                exchange.response_bytes,
            )
        principal = scope.get("state", {}).get("principal")
        token = None
        if exchange.server_span is not None:
            # The server span has ended; its ids still label the line.
            span = NonRecordingSpan(exchange.server_span)
            token = otel_context.attach(trace.set_span_in_context(span))
        try:
            log_request(
                quiet=quiet,
                method=exchange.method,
                route=template or "unmatched",
                path=scope["path"],
                status=exchange.status,
                seconds=ended - exchange.started,
                principal=principal.subject if principal is not None else None,
                tenant=principal.tenant if principal is not None else None,
                admin=principal is not None and principal.admin,
            )
        finally:
            if token is not None:
                otel_context.detach(token)
            if exchange.trace is not None:
                exchange.trace.end()


class _Exchange:
    """One request's observations, filled in as its response starts."""

    __slots__ = (
        "_extra",
        "_send",
        "first_byte",
        "gone",
        "method",
        "receive_from",
        "response_bytes",
        "server_span",
        "started",
        "status",
        "trace",
    )

    def __init__(self, send: Send, extra: list[tuple[bytes, bytes]] | None) -> None:
        self._send = send
        self._extra = extra
        self.started = perf_counter()
        self.method = ""
        self.status = 500  # what the client sees if the app raises before responding
        self.response_bytes = 0
        self.first_byte = 0.0
        self.server_span: SpanContext | None = None
        self.trace: RequestTrace | None = None
        self.gone = False  # the app was told the client disconnected
        self.receive_from: Receive | None = None

    async def receive(self) -> Message:
        assert self.receive_from is not None
        message = await self.receive_from()
        if message["type"] == "http.disconnect":
            self.gone = True
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.first_byte = perf_counter()
            self.status = message["status"]
            headers = message.get("headers", [])
            self.response_bytes = _content_length(headers)
            if self._extra is not None:
                message["headers"] = [*headers, *self._extra]
            if self.trace is not None and self.trace.sampled:
                found = trace.get_current_span().get_span_context()
                self.server_span = found if found.is_valid else None
        await self._send(message)


def _content_length(headers: list[tuple[bytes, bytes]]) -> int:
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


def install(
    app: FastAPI,
    *,
    metrics: AppMetrics | None,
    sampler: HeadSampler | None,
    headers: HardeningHeaders | None,
) -> None:
    """Put the edge around the whole middleware stack, outside the OpenTelemetry middleware
    (which FastAPIInstrumentor wraps around the stack when it is built): call after it."""
    build = app.build_middleware_stack

    def build_with_edge() -> ASGIApp:
        return Edge(
            build(), metrics=metrics, sampler=sampler, headers=headers, routes=app.router.routes
        )

    app.build_middleware_stack = build_with_edge  # type: ignore[method-assign]
