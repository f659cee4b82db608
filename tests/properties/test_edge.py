"""The edge layer's bookkeeping (app.api.edge) for any way a request can go: the app raising
before or after its response starts, the client leaving before or after it, HEAD, streamed
bodies of any number of chunks, probes, a root path.

Invariants, for every generated request:
- exactly one HTTP metrics observation and one access line, with the status the client saw
  (the response's), 500 when the app failed before answering, 499 when the client had gone;
- the in-flight gauge is back where it was;
- the hardening headers are added once, to the response start only;
- the method is the client's (HEAD stays HEAD in the metrics and the log);
- probes (with or without a root path) are neither counted nor logged at INFO.

The 499 rule failed on the edge before it (a client that left an SSE stream before its first
token was counted as 500, feeding the 5xx burn-rate alerts)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from starlette.types import Message, Receive, Scope, Send

from app.api.edge import Edge
from app.api.middleware import HardeningHeaders
from app.telemetry.metrics import AppMetrics


@dataclass(frozen=True)
class Script:
    """How the app behaves for one request."""

    disconnect_first: bool  # the client is gone before the app answers
    start: bool  # the app starts a response
    status: int
    chunks: int  # body messages after the start (the last one ends the body)
    raise_before: bool  # the app raises before starting
    raise_after: bool  # the app raises after starting
    length: int | None  # Content-Length the app declares


scripts = st.builds(
    Script,
    disconnect_first=st.booleans(),
    start=st.booleans(),
    status=st.sampled_from([200, 201, 204, 304, 400, 404, 413, 429, 500, 503]),
    chunks=st.integers(0, 4),
    raise_before=st.booleans(),
    raise_after=st.booleans(),
    length=st.none() | st.integers(0, 10_000),
)


class Boom(Exception):
    pass


def app_for(script: Script) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if script.disconnect_first:
            assert (await receive())["type"] == "http.disconnect"
        if script.raise_before or not script.start:
            if script.raise_before:
                raise Boom
            return
        headers = (
            [] if script.length is None else [(b"content-length", str(script.length).encode())]
        )
        await send({"type": "http.response.start", "status": script.status, "headers": headers})
        for index in range(script.chunks):
            last = index == script.chunks - 1
            await send({"type": "http.response.body", "body": b"x", "more_body": not last})
        if script.raise_after:
            raise Boom

    return app


def expected_status(script: Script) -> int:
    if script.start and not script.raise_before:
        return script.status
    return 499 if script.disconnect_first else 500


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record)


def _run(edge: Edge, scope: Scope) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    async def call() -> None:
        # Boom is what uvicorn meets: its own error handling, outside the edge.
        with contextlib.suppress(Boom):
            await edge(scope, receive, send)

    asyncio.run(call())
    return sent


def _scope(method: str, path: str, root: str = "") -> Scope:
    return {
        "type": "http",
        "method": method,
        "path": root + path,
        "root_path": root,
        "headers": [(b"host", b"api.example.com")],
        "state": {},
    }


def _count(registry: CollectorRegistry, **labels: str) -> float:
    return registry.get_sample_value("http_requests_total", labels) or 0.0


@settings(max_examples=300, deadline=None)
@given(
    script=scripts,
    method=st.sampled_from(["GET", "HEAD", "POST", "PATCH", "DELETE"]),
    root=st.sampled_from(["", "/api"]),
)
def test_every_request_is_observed_once_with_the_status_the_client_saw(
    script: Script, method: str, root: str
) -> None:
    registry = CollectorRegistry()
    metrics = AppMetrics(registry)
    recorder = Recorder()
    access = logging.getLogger("itemstream.access")
    level = access.level
    access.addHandler(recorder)
    access.setLevel(logging.DEBUG)
    try:
        edge = Edge(app_for(script), metrics=metrics, sampler=None, headers=HardeningHeaders())
        sent = _run(edge, _scope(method, "/v1/items", root))
    finally:
        access.removeHandler(recorder)
        access.setLevel(level)
    status = expected_status(script)
    observed = _count(registry, method=method, status=str(status), handler="none")
    assert observed == 1.0, (script, method, status)
    total = sum(
        sample.value
        for family in registry.collect()
        if family.name == "http_requests"
        for sample in family.samples
        if sample.name == "http_requests_total"
    )
    assert total == 1.0, "observed more than once"
    assert registry.get_sample_value("itemstream_http_requests_in_flight") == 0.0
    (line,) = [r for r in recorder.lines if r.levelno == logging.INFO]
    assert line.__dict__["http"]["status"] == status
    assert line.__dict__["http"]["method"] == method
    starts = [m for m in sent if m["type"] == "http.response.start"]
    for start in starts:
        names = [name for name, _ in start["headers"]]
        assert names.count(b"x-content-type-options") == 1, "hardening headers once"
    for body in (m for m in sent if m["type"] == "http.response.body"):
        assert "headers" not in body


@settings(max_examples=50, deadline=None)
@given(path=st.sampled_from(["/livez", "/readyz", "/metrics"]), root=st.sampled_from(["", "/api"]))
def test_probes_are_quiet_with_or_without_a_root_path(path: str, root: str) -> None:
    registry = CollectorRegistry()
    recorder = Recorder()
    access = logging.getLogger("itemstream.access")
    level = access.level
    access.addHandler(recorder)
    access.setLevel(logging.DEBUG)
    script = Script(False, True, 200, 1, False, False, 2)
    try:
        edge = Edge(app_for(script), metrics=AppMetrics(registry), sampler=None, headers=None)
        _run(edge, _scope("GET", path, root))
    finally:
        access.removeHandler(recorder)
        access.setLevel(level)
    assert (
        registry.get_sample_value(
            "http_requests_total", {"method": "GET", "status": "200", "handler": "none"}
        )
        is None
    )
    assert all(r.levelno == logging.DEBUG for r in recorder.lines), "a probe logged at INFO"
