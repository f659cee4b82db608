"""OpenTelemetry traces, configured from the standard OTEL_* variables.

Set up once per worker after the fork (gunicorn `post_fork`; the app factory does it for
single-process runs): the batch processor's thread and the exporter's HTTP session must not be
inherited from the master. Off, with no overhead, when no OTLP endpoint is configured."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping
from contextlib import AbstractContextManager
from contextvars import ContextVar

import httpx
from fastapi import FastAPI
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from starlette.types import ASGIApp

from app.config import OtelSettings
from app.probes import PROBE_PATHS

log = logging.getLogger(__name__)

NOT_TRACED = ",".join(sorted(path.lstrip("/") for path in PROBE_PATHS))

_provider: TracerProvider | None = None
_configured_pid: int | None = None


def configure(otel: OtelSettings) -> TracerProvider | None:
    """Install the global tracer provider for this process (idempotent per PID)."""
    global _provider, _configured_pid  # noqa: PLW0603 - one provider per process, by design
    if _configured_pid == os.getpid():
        return _provider
    _configured_pid = os.getpid()
    _provider = None
    exporter = _exporter(otel)
    if exporter is None:
        return None
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; with
    # OTEL_TRACES_SAMPLER set, TracerProvider reads it (and _ARG) itself.
    resource = Resource.create({SERVICE_NAME: otel.service_name})
    sampler = None
    if otel.traces_sampler is None:
        sampler = ParentBased(TraceIdRatioBased(otel.traces_sampler_arg))
    provider = TracerProvider(resource=resource, sampler=sampler, id_generator=_HeadIds())
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    log.info("tracing to %s", otel.traces_exporter)
    return provider


def head_sampler() -> HeadSampler | None:
    """The per-request sampling decision, when this process traces."""
    return HeadSampler(_provider.sampler) if _provider is not None else None


# The trace id a request's head decision was made for; the SDK's id generator hands it to the
# server span, so that the configured sampler, asked again by the SDK, decides the same way.
_decided_trace_id: ContextVar[int] = ContextVar("itemstream_decided_trace_id", default=0)


class _HeadIds(RandomIdGenerator):
    def generate_trace_id(self) -> int:
        decided = _decided_trace_id.get()
        if decided:
            _decided_trace_id.set(0)  # once: a later root span in the request gets its own
            return decided
        return super().generate_trace_id()


def propagated_fields() -> frozenset[str]:
    """The headers the configured propagators read and write (OTEL_PROPAGATORS: W3C trace
    context and baggage by default, B3 or Jaeger when configured so)."""
    return frozenset(propagate.get_global_textmap().fields)


class RequestTrace:
    """A request's trace identity, decided once at the edge: `sampled` requests go through the
    OpenTelemetry middleware (full spans); the others run under a non-recording span that
    carries the trace id (for logs and propagation) and create no span objects at all."""

    __slots__ = ("_token", "sampled")

    def __init__(self, sampled: bool, token: object | None) -> None:
        self.sampled = sampled
        self._token = token

    def end(self) -> None:
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]


class HeadSampler:
    """Asks the configured sampler (OTEL_TRACES_SAMPLER, parent-based ratio by default) once
    per request, before any span exists."""

    def __init__(self, sampler: Sampler) -> None:
        self._sampler = sampler
        self._fields = frozenset(name.encode("latin-1") for name in propagated_fields())

    def begin(self, headers: list[tuple[bytes, bytes]]) -> RequestTrace:
        parent: otel_context.Context | None = None
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in headers
            if name in self._fields
        }
        parent_span = None
        if carrier:
            parent = propagate.extract(carrier)
            found = trace.get_current_span(parent).get_span_context()
            parent_span = found if found.is_valid else None
        trace_id = parent_span.trace_id if parent_span else random.getrandbits(128) or 1
        result = self._sampler.should_sample(parent, trace_id, "HTTP", SpanKind.SERVER)
        if result.decision.is_recording():  # type: ignore[no-untyped-call]
            if parent_span is None:
                _decided_trace_id.set(trace_id)
            return RequestTrace(True, None)
        unsampled = SpanContext(
            trace_id,
            random.getrandbits(64) or 1,
            is_remote=False,
            trace_flags=TraceFlags(TraceFlags.DEFAULT),
            trace_state=parent_span.trace_state if parent_span else result.trace_state,
        )
        token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(unsampled), parent))
        return RequestTrace(False, token)


def _exporter(otel: OtelSettings) -> SpanExporter | None:
    if not otel.tracing_enabled:
        return None
    if otel.traces_exporter == "console":
        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # Reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, _HEADERS, _TIMEOUT, _COMPRESSION.
    return OTLPSpanExporter()


def instrument_app(app: FastAPI) -> None:
    if _provider is None:
        return
    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=_provider,
        excluded_urls=NOT_TRACED,
        # One span per request, not one per body chunk (SSE streams send thousands).
        exclude_spans=["receive", "send"],
    )


def without_tracing(stack: ASGIApp) -> ASGIApp | None:
    """The part of a built middleware stack inside the OpenTelemetry middleware (what an
    unsampled request runs), or None if the stack is not instrumented."""
    layer: object = stack
    for _ in range(3):  # FastAPIInstrumentor: ServerErrorMiddleware(OpenTelemetryMiddleware(...))
        if isinstance(layer, OpenTelemetryMiddleware):
            inner: ASGIApp = layer.app
            return inner
        layer = getattr(layer, "app", None)
    return None


def untraced() -> AbstractContextManager[None]:
    """No spans inside (probes every few seconds would flood the trace store)."""
    return suppress_instrumentation()


def flush(timeout_millis: int = 5000) -> None:
    if _provider is not None:
        _provider.force_flush(timeout_millis)


def shutdown() -> None:
    if _provider is not None:
        _provider.shutdown()


def outgoing_headers(incoming: Mapping[str, str]) -> dict[str, str]:
    """Trace context for an upstream call: the current span's when tracing is on (the httpx
    instrumentation re-injects it for its own client span), else the caller's as is."""
    headers: dict[str, str] = {}
    if trace.get_current_span().get_span_context().is_valid:
        propagate.inject(headers)
        return headers
    for name in propagated_fields():
        value = incoming.get(name)
        if value:
            headers[name] = value
    return headers


def instrument_http_client(client: httpx.AsyncClient) -> None:
    if _provider is None:
        return
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    HTTPXClientInstrumentor.instrument_client(client, tracer_provider=_provider)
