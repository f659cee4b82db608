"""OpenTelemetry traces, configured from the standard OTEL_* variables.

Set up once per worker after the fork (gunicorn `post_fork`; the app factory does it for
single-process runs): the batch processor's thread and the exporter's HTTP session must not be
inherited from the master. Off, with no overhead, when no OTLP endpoint is configured."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from contextlib import AbstractContextManager

import httpx
from fastapi import FastAPI
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from app.config import Settings
from app.probes import PROBE_PATHS

log = logging.getLogger(__name__)

NOT_TRACED = ",".join(sorted(path.lstrip("/") for path in PROBE_PATHS))

_provider: TracerProvider | None = None
_configured_pid: int | None = None


def configure(settings: Settings) -> TracerProvider | None:
    """Install the global tracer provider for this process (idempotent per PID)."""
    global _provider, _configured_pid  # noqa: PLW0603 - one provider per process, by design
    if _configured_pid == os.getpid():
        return _provider
    _configured_pid = os.getpid()
    _provider = None
    exporter = _exporter(settings)
    if exporter is None:
        return None
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; with
    # OTEL_TRACES_SAMPLER set, TracerProvider reads it (and _ARG) itself.
    resource = Resource.create({SERVICE_NAME: settings.otel_service_name})
    sampler = None
    if settings.otel_traces_sampler is None:
        sampler = ParentBased(TraceIdRatioBased(settings.otel_traces_sampler_arg))
    provider = TracerProvider(resource=resource, sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    log.info("tracing to %s", settings.otel_traces_exporter)
    return provider


def _exporter(settings: Settings) -> SpanExporter | None:
    if not settings.tracing_enabled:
        return None
    if settings.otel_traces_exporter == "console":
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


def untraced() -> AbstractContextManager[None]:
    """No spans inside (probes every few seconds would flood the trace store)."""
    return suppress_instrumentation()


def flush(timeout_millis: int = 5000) -> None:
    if _provider is not None:
        _provider.force_flush(timeout_millis)


def shutdown() -> None:
    if _provider is not None:
        _provider.shutdown()


_TRACE_HEADERS = ("traceparent", "tracestate")


def outgoing_headers(incoming: Mapping[str, str]) -> dict[str, str]:
    """W3C trace context for an upstream call: the current span's when tracing is on (the
    httpx instrumentation re-injects it for its own client span), else the caller's as is."""
    headers: dict[str, str] = {}
    if trace.get_current_span().get_span_context().is_valid:
        propagate.inject(headers)
        return headers
    for name in _TRACE_HEADERS:
        value = incoming.get(name)
        if value:
            headers[name] = value
    return headers


def instrument_http_client(client: httpx.AsyncClient) -> None:
    if _provider is None:
        return
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    HTTPXClientInstrumentor.instrument_client(client, tracer_provider=_provider)
