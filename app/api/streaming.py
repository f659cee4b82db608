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
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from app.api.problems import detail_for
from app.config import Settings
from app.domain.errors import Overloaded, ServiceError, StreamLimitExceeded
from app.lifecycle import WATCHES_DISCONNECT, Lifecycle
from app.providers.base import ProviderError
from app.services.generations import Finished, Outcome, Run

log = logging.getLogger(__name__)

HEARTBEAT = b": ping\n\n"
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx and friends: do not buffer this response
]

_cleanups: set[asyncio.Task[Any]] = set()  # keeps shielded cleanups alive until they end
MAX_TICK = 0.25  # how often the watch looks at every stream, at most


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
        # Read by the watch:
        self._producer: asyncio.Future[tuple[Outcome, str | None]] | None = None
        self._send_to: Send | None = None
        self._sending_since: float | None = None  # a send is waiting on the client
        self._last_sent = time.monotonic()
        self._heartbeat: asyncio.Future[None] | None = None
        self._drain_until: float | None = None
        self._stop_reason: str | None = None  # why the watch cancelled the producer
        self._ending = False  # the producer is sending its last event

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
            heartbeat_seconds=settings.streams.heartbeat_seconds,
            drain_seconds=settings.streams.drain_seconds,
            send_timeout=settings.streams.send_timeout,
            lifecycle=lifecycle,
            headers=headers,
            detach=detach,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # It watches its client itself (a detached generation goes on without it).
        scope[WATCHES_DISCONNECT] = True
        outcome: Outcome = "cancelled"
        error: str | None = None
        self._send_to = send
        producer = self._producer = asyncio.ensure_future(self._produce(send))
        disconnect = asyncio.ensure_future(_wait_for_disconnect(receive))
        watch = StreamWatch.of_running_loop()
        watch.add(self)
        try:
            done, _ = await asyncio.wait(
                {producer, disconnect}, return_when=asyncio.FIRST_COMPLETED
            )
            if producer not in done and self.detach:
                # The client left; the generation goes on (its text is saved and stored, and
                # the client may resume it from its last event id).
                self._detached = True
                await asyncio.wait({producer})
            if producer.done():
                outcome, error = producer.result()
            else:
                outcome, error = "cancelled", "the client disconnected"
        finally:
            watch.discard(self)
            # The producer is cancelled once, by the cleanup: a second cancel() would land in
            # httpcore's shielded close of the upstream connection and leave it open.
            for task in (disconnect, self._heartbeat):
                if task is not None:
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
        """Send the stream; returns how it ended. Errors become a status or a final event.
        Deadline, drain and a stuck client are the watch's to notice: it cancels this task
        with a reason (a token costs no timer or task of its own)."""
        run = self.run
        index = 0
        try:
            try:
                while True:
                    try:
                        text = await run.__anext__()
                    except StopAsyncIteration:
                        break
                    await self._send(send, self.format.text(run, text, index))
                    index += 1
                self._ending = True
                finished = await run.finish("completed")
                await self._send(send, self.format.closing(run, finished), more=False)
                return "completed", None
            except asyncio.CancelledError:
                reason = self._stop_reason
                task = asyncio.current_task()
                if reason is None or task is None:
                    raise
                task.uncancel()
                self._stop_reason = None
                if reason == "stalled":
                    raise _StoppedReading from None
                if reason == "deadline":
                    raise StreamLimitExceeded("the stream reached its maximum duration") from None
                error = "the server shut down before the stream ended"
                with contextlib.suppress(_StoppedReading):
                    await self._fail(send, Overloaded(error, retry_after=1))
                return "failed", error
        except (ProviderError, ServiceError) as failure:
            with contextlib.suppress(_StoppedReading):
                await self._fail(send, failure)
            return "failed", detail_for(failure)
        except _StoppedReading:
            return "cancelled", f"the client read nothing for {self.send_timeout:g}s"

    async def _send(
        self, send: Send, body: bytes, *, more: bool = True, start: Message | None = None
    ) -> None:
        """One body message (after the status line if it has not gone out: the stream's 200,
        or `start`, an error's); watched, as every write to the client is."""
        writing = False  # this call's own write is under way (not only waiting its turn)
        try:
            heartbeat = self._heartbeat
            if heartbeat is not None and heartbeat is not asyncio.current_task():
                # One send at a time. wait(), not await: a heartbeat the watch cancelled (a
                # client that reads nothing) must not cancel this send's task with it.
                await asyncio.wait({heartbeat})
            if self._detached:
                return
            writing = True
            self._sending_since = time.monotonic()
            if not self._started:
                self._started = True
                if start is None:
                    start = {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": self.raw_headers,
                    }
                    body = self.format.opening(self.run) + body
                await send(start)
            # The server's send waits while the client's socket is full: memory stays bounded,
            # and past send_timeout the watch gives up on the client.
            await send({"type": "http.response.body", "body": body, "more_body": more})
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._stop_reason != "stalled" or task is None:
                raise
            # The watch gave up on a client that reads nothing, wherever this send came from
            # (a token, the final event, an error event after a deadline or a shutdown).
            task.uncancel()
            self._stop_reason = None
            if not self.detach:
                raise _StoppedReading from None
            self._detached = True  # the run goes on without its client
        finally:
            if writing:  # a call that never wrote leaves the heartbeat's watched write alone
                self._sending_since = None
                self._last_sent = time.monotonic()
        self._ended = not more

    def check(self, now: float) -> None:
        """Called by the watch: stop at the deadline or after the drain, give up on a client
        that has taken nothing for send_timeout, and send a heartbeat when one is due."""
        producer = self._producer
        if (
            producer is None
            or producer.done()
            or self._stop_reason is not None
            or self._send_to is None
        ):
            return
        if self._ending:
            # Its last event is on its way (the end, or the error a stop produced): only a
            # client that takes nothing more can still end it sooner.
            if self._sending_since is not None and now - self._sending_since >= self.send_timeout:
                self._stop("stalled")
            return
        if self.lifecycle.shutting_down:
            if self._drain_until is None:
                self._drain_until = now + self.drain
            if now >= self._drain_until:
                self._stop("shutdown")
                return
        if now >= self.run.deadline:
            self._stop("deadline")
        elif self._sending_since is not None:
            if now - self._sending_since >= self.send_timeout:
                self._stop("stalled")
        elif (
            now - self._last_sent >= self.heartbeat
            and not self._detached
            and (self._heartbeat is None or self._heartbeat.done())
        ):
            self._heartbeat = asyncio.ensure_future(self._send(self._send_to, HEARTBEAT))
            self._heartbeat.add_done_callback(_quietly)

    def _stop(self, reason: str) -> None:
        heartbeat = self._heartbeat
        if reason == "stalled" and self.detach and heartbeat is not None and not heartbeat.done():
            # Stuck in a heartbeat while the run waits for its model: leave the client only.
            self._detached = True
            heartbeat.cancel()
            return
        self._stop_reason = reason
        assert self._producer is not None
        self._producer.cancel()

    async def _fail(self, send: Send, failure: Exception) -> None:
        self._ending = True
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
        start = {"type": "http.response.start", "status": status, "headers": raw_headers}
        await self._send(send, body, more=False, start=start)


def _quietly(task: asyncio.Future[Any]) -> None:
    """A heartbeat's failure (the client gone) is the producer's to meet at its next send."""
    if not task.cancelled():
        task.exception()


_watches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, StreamWatch] = (
    weakref.WeakKeyDictionary()
)


class StreamWatch:
    """One per event loop: every `tick` it checks each open stream (deadline, drain on
    shutdown, a send stuck past send_timeout, a heartbeat due). Per token a stream then pays
    for no timer, task or wait of its own, and shutdown wakes no per-stream waiter."""

    def __init__(self) -> None:
        self._streams: set[EventStreamResponse] = set()
        self._task: asyncio.Task[None] | None = None
        self.tick = MAX_TICK

    @classmethod
    def of_running_loop(cls) -> StreamWatch:
        loop = asyncio.get_running_loop()
        watch = _watches.get(loop)
        if watch is None:
            watch = _watches[loop] = cls()
        return watch

    def add(self, stream: EventStreamResponse) -> None:
        self._streams.add(stream)
        # Fine enough for the shortest heartbeat asked for.
        self.tick = min(self.tick, stream.heartbeat / 3)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    def discard(self, stream: EventStreamResponse) -> None:
        self._streams.discard(stream)

    async def _run(self) -> None:
        while self._streams:
            await asyncio.sleep(self.tick)
            now = time.monotonic()
            for stream in list(self._streams):
                stream.check(now)
        self.tick = MAX_TICK  # ends with the last stream; the next one starts it again


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
