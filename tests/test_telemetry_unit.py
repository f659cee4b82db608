"""In-process checks of the telemetry pieces (the process-level ones are in test_telemetry.py)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx
import pytest
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator, default_getter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import ValidationError

from app.config import Settings
from app.lifecycle import Lifecycle
from app.main import create_app
from app.telemetry.logs import JsonFormatter
from app.telemetry.tracing import HeadSampler


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_readiness_turns_false_when_shutdown_begins(settings: Settings) -> None:
    lifecycle = Lifecycle()
    app = create_app(settings, lifecycle)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/readyz")).status_code == 200
            lifecycle.begin_shutdown()
            await asyncio.wait_for(lifecycle.wait(), 1)
            response = await client.get("/readyz")
            assert response.status_code == 503
            assert response.json()["detail"] == "shutting down"
            assert (await client.get("/livez")).status_code == 200


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_metrics_on_the_app_port_in_one_process(client: httpx.AsyncClient) -> None:
    for _ in range(3):
        await client.get("/v1/items")
    await client.get("/readyz")
    text = (await client.get("/metrics")).text
    line = next(
        sample
        for sample in text.splitlines()
        if sample.startswith('http_requests_total{handler="/v1/items",method="GET",status="200"}')
    )
    assert line.endswith(" 3.0")
    assert 'handler="/readyz"' not in text  # probes are not counted
    assert "itemstream_http_requests_in_flight 0.0" in text


def test_grpc_exporter_is_refused_with_a_clear_message() -> None:
    with pytest.raises(ValidationError, match="http/protobuf"):
        Settings(
            _env_file=None,
            otel_exporter_otlp_endpoint="http://collector:4317",
            otel_exporter_otlp_protocol="grpc",
        )


def test_tracing_is_off_without_an_endpoint() -> None:
    assert not Settings(_env_file=None).telemetry.otel.tracing_enabled
    on = Settings(_env_file=None, otel_exporter_otlp_endpoint="http://c:4318")
    assert on.telemetry.otel.tracing_enabled
    off = Settings(
        _env_file=None, otel_exporter_otlp_endpoint="http://c:4318", otel_sdk_disabled=True
    )
    assert not off.telemetry.otel.tracing_enabled


def test_json_log_lines_carry_trace_ids_and_extras() -> None:
    tracer = TracerProvider().get_tracer("test")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    record.http = {"status": 200}
    with tracer.start_as_current_span("op") as span:
        line = json.loads(JsonFormatter().format(record))
        context = span.get_span_context()
    assert line["msg"] == "hello world"
    assert line["level"] == "info"
    assert line["http"] == {"status": 200}
    assert line["trace_id"] == format(context.trace_id, "032x")
    assert line["span_id"] == format(context.span_id, "016x")
    outside = json.loads(JsonFormatter().format(record))
    assert "trace_id" not in outside


class _XTrace(TextMapPropagator):
    """A propagator with a header of its own, standing in for B3 or Jaeger."""

    @property
    def fields(self) -> set[str]:
        return {"x-trace"}

    def extract(
        self, carrier: Any, context: Context | None = None, getter: Any = default_getter
    ) -> Context:
        found = getter.get(carrier, "x-trace")
        if not found:
            return context or Context()
        parent = SpanContext(int(found[0], 16), 1, is_remote=True, trace_flags=TraceFlags(1))
        return trace.set_span_in_context(NonRecordingSpan(parent), context)

    def inject(self, carrier: Any, context: Context | None = None, setter: Any = None) -> None:
        return None


def test_the_head_decision_reads_the_configured_propagators() -> None:
    """A sampled parent arriving in the headers of a configured propagator (OTEL_PROPAGATORS)
    is followed at the edge, not only W3C traceparent."""
    before = propagate.get_global_textmap()
    propagate.set_global_textmap(CompositePropagator([TraceContextTextMapPropagator(), _XTrace()]))
    try:
        sampler = HeadSampler(ParentBased(ALWAYS_OFF))
        assert not sampler.begin([]).sampled  # a new trace: the sampler says no
        decided = sampler.begin([(b"x-trace", b"4bf92f3577b34da6a3ce929d0e0e4736")])
        assert decided.sampled, "the sampled parent from x-trace is followed"
        decided.end()
    finally:
        propagate.set_global_textmap(before)
