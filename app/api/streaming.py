"""Server-Sent Events for generations, as a pure ASGI response.

Starlette's StreamingResponse abandons its iterator when the client disconnects (no
`aclose()`, so an upstream stream stays open) and cannot answer with an error status once
iteration has begun. This response owns the whole exchange:

- it holds the status line until the first token, an error, or the first heartbeat is due, so
  an upstream failure before the first token still gets a real status (429, 502, 504);
- it watches for `http.disconnect` from the first moment and cancels the upstream at once, or
  (`detach`) lets the run go on without its client, which may resume it from its records;
- it writes heartbeat comments while the upstream is silent, enforces the stream deadline and,
  when the process shuts down, lets the stream finish for a drain period before ending it with
  a final error event;
- whatever happens, the run is finished exactly once, shielded from cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from app.api.problems import detail_for
from app.config import Settings
from app.lifecycle import Lifecycle
from app.providers.base import ProviderError
from app.services.errors import Overloaded, ServiceError, StreamLimitExceeded
from app.services.generations import Finished, Outcome, Run

log = logging.getLogger(__name__)

HEARTBEAT = b": ping\n\n"
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx and friends: do not buffer this response
]

_cleanups: set[asyncio.Task[Any]] = set()  # keeps shielded cleanups alive until they end


class StreamFormat(Protocol):
    """How a run's events look on the wire (item events or OpenAI chunks)."""

    def opening(self, run: Run) -> bytes: ...
    def text(self, run: Run, text: str, index: int) -> bytes: ...
    def closing(self, run: Run, finished: Finished) -> bytes: ...
    def failure(self, run: Run, error: Exception) -> bytes: ...
    def error_response(self, error: Exception) -> tuple[int, dict[str, str], bytes, str]:
        """Status, headers, body and content type for an error before the stream started."""
        ...


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(
        self,
        run: Run,
        stream_format: StreamFormat,
        *,
        heartbeat_seconds: float,
        drain_seconds: float,
        lifecycle: Lifecycle,
        headers: dict[str, str] | None = None,
        send_timeout: float = 30.0,
        detach: bool = False,
    ) -> None:
        self.run = run
        # Whether the run goes on without its client (one that disconnects or stops reading).
        self.detach = detach
        self._detached = False
        self.send_timeout = send_timeout
        self.format = stream_format
        self.heartbeat = heartbeat_seconds
        self.drain = drain_seconds
        self.lifecycle = lifecycle
        # A Response only to FastAPI (which returns it as is); it sends everything itself.
        self.status_code = 200
        self.background = None
        self.raw_headers = SSE_HEADERS + [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in (headers or {}).items()
        ]
        self._started = False  # the status line went out
        self._ended = False  # the last body chunk went out

    @classmethod
    def configured(
        cls,
        run: Run,
        stream_format: StreamFormat,
        settings: Settings,
        lifecycle: Lifecycle,
        *,
        headers: dict[str, str] | None = None,
        detach: bool = False,
    ) -> EventStreamResponse:
        """With the deployment's stream settings."""
        return cls(
            run,
            stream_format,
            heartbeat_seconds=settings.stream_heartbeat_seconds,
            drain_seconds=settings.stream_drain_seconds,
            send_timeout=settings.stream_send_timeout,
            lifecycle=lifecycle,
            headers=headers,
            detach=detach,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome: Outcome = "cancelled"
        error: str | None = None
        producer = asyncio.ensure_future(self._produce(send))
        disconnect = asyncio.ensure_future(_wait_for_disconnect(receive))
        shutdown = asyncio.ensure_future(self.lifecycle.wait())
        try:
            done, _ = await asyncio.wait(
                {producer, disconnect, shutdown}, return_when=asyncio.FIRST_COMPLETED
            )
            if self.detach and disconnect in done and producer not in done:
                # The client left; the generation goes on (its text is saved and stored, and
                # the client may resume it from its last event id).
                self._detached = True
                done, _ = await asyncio.wait(
                    {producer, shutdown}, return_when=asyncio.FIRST_COMPLETED
                )
            client_left = disconnect in done and not self._detached
            if producer not in done and not client_left:
                # Shutdown: give the stream a chance to end by itself, then end it.
                watch = {producer} if self._detached else {producer, disconnect}
                done, _ = await asyncio.wait(
                    watch, timeout=self.drain, return_when=asyncio.FIRST_COMPLETED
                )
                client_left = disconnect in done and not self._detached
            if producer in done:
                outcome, error = producer.result()
            elif client_left:
                outcome, error = "cancelled", "the client disconnected"
            else:
                outcome, error = "failed", "the server shut down before the stream ended"
                await _cancel(producer)
                with contextlib.suppress(_StoppedReading):
                    await self._fail(send, Overloaded(error, retry_after=1))
        finally:
            for task in (producer, disconnect, shutdown):
                task.cancel()
            cleanup = asyncio.ensure_future(self._cleanup(producer, outcome, error))
            _cleanups.add(cleanup)
            cleanup.add_done_callback(_cleanups.discard)
            await asyncio.shield(cleanup)

    async def _cleanup(
        self, producer: asyncio.Future[Any], outcome: Outcome, error: str | None
    ) -> None:
        await _cancel(producer)
        try:
            await self.run.finish(outcome, error)
        except Exception as failure:  # the row stays "streaming"; the sweeper fails it later
            log.warning("could not record the end of generation %s: %s", self.run.id, failure)

    async def _produce(self, send: Send) -> tuple[Outcome, str | None]:
        """Send the stream; returns how it ended. Errors become a status or a final event."""
        run = self.run
        pending: asyncio.Future[str] | None = None
        index = 0
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(run.__anext__())
                remaining = run.deadline - time.monotonic()
                if remaining <= 0:
                    raise StreamLimitExceeded("the stream reached its maximum duration")
                done, _ = await asyncio.wait({pending}, timeout=min(self.heartbeat, remaining))
                if not done:
                    if time.monotonic() < run.deadline:
                        await self._send(send, HEARTBEAT)
                    continue
                finished_task, pending = pending, None
                try:
                    text = finished_task.result()
                except StopAsyncIteration:
                    break
                await self._send(send, self.format.text(run, text, index))
                index += 1
            finished = await run.finish("completed")
            await self._send(send, self.format.closing(run, finished), more=False)
            return "completed", None
        except (ProviderError, ServiceError) as failure:
            if pending is not None:
                await _cancel(pending)
            with contextlib.suppress(_StoppedReading):
                await self._fail(send, failure)
            return "failed", detail_for(failure)
        except _StoppedReading:
            return "cancelled", f"the client read nothing for {self.send_timeout:g}s"
        finally:
            if pending is not None:
                await _cancel(pending)

    async def _send(self, send: Send, body: bytes, *, more: bool = True) -> None:
        if self._detached:
            return
        if not self._started:
            self._started = True
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            body = self.format.opening(self.run) + body
        try:
            # The server's send waits while the client's socket is full: bounded memory, and
            # past the timeout the client is given up on.
            async with asyncio.timeout(self.send_timeout):
                await send({"type": "http.response.body", "body": body, "more_body": more})
        except TimeoutError:
            if not self.detach:
                raise _StoppedReading from None
            self._detached = True  # a client that reads nothing is left; the run goes on
        self._ended = not more

    async def _fail(self, send: Send, failure: Exception) -> None:
        if self._ended:
            return
        if self._started:
            await self._send(send, self.format.failure(self.run, failure), more=False)
            return
        status, headers, body, media_type = self.format.error_response(failure)
        raw_headers = [
            (b"content-type", media_type.encode()),
            (b"content-length", str(len(body)).encode()),
            *((k.lower().encode(), v.encode()) for k, v in headers.items()),
        ]
        self._started = self._ended = True
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


class _StoppedReading(Exception):
    """The client has taken nothing of the stream for send_timeout seconds."""


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _cancel(future: asyncio.Future[Any]) -> None:
    """Cancel and wait until it has really stopped (an async generator cannot be closed while
    a cancelled `__anext__` is still unwinding)."""
    if future.done():
        with contextlib.suppress(BaseException):
            future.result()
        return
    future.cancel()
    with contextlib.suppress(BaseException):
        await future


def sse_event(data: Any, *, event: str | None = None, event_id: str | None = None) -> bytes:
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    lines.extend(f"data: {line}" for line in payload.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


class ExportResponse(Response):
    """Streams what `produce` writes, pulled at the client's pace. The status line waits for
    the first chunk, so a database that is down still gets its 503. A client that goes away
    cancels `produce` (which stops the query); a failure after the first chunk aborts the
    connection, so the client sees a broken transfer rather than a silently short file."""

    def __init__(
        self,
        produce: Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[int]],
        *,
        media_type: str,
        filename: str,
    ) -> None:
        self.produce = produce
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", media_type.encode()),
            (b"content-disposition", f'attachment; filename="{filename}"'.encode()),
            (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def write(chunk: bytes) -> None:
            nonlocal started
            if not started:
                started = True
                await send(
                    {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                )
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

        producer = asyncio.ensure_future(self.produce(write))
        disconnect = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            done, _ = await asyncio.wait(
                {producer, disconnect}, return_when=asyncio.FIRST_COMPLETED
            )
            if producer not in done:
                log.info("export cancelled: the client disconnected")
                return
            rows = producer.result()
            if not started:
                await send(
                    {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                )
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            log.debug("exported %d rows", rows)
        finally:
            disconnect.cancel()
            await _cancel(producer)
