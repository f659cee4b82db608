"""Bounded HTTP/1.1 reading: uvicorn's httptools protocol with the limits it lacks.

uvicorn's httptools protocol reads request lines and headers of any size and count, and gives
a client unlimited time to send them and its body: a 10 MB header line was served, 100,000
headers too, and a client sending one header byte per second held its connection (and the
memory it had sent) forever. gunicorn has the limits (`limit_request_line`,
`limit_request_fields`, `limit_request_field_size`), but only its own HTTP parser applies
them, which uvicorn workers do not use. This subclass applies gunicorn's limits, plus a total
header size and two deadlines (the measured reasons are in docs/operations.md, "HTTP limits"):

- a request line longer than `limit_request_line`: 414; more header fields than
  `limit_request_fields`, one longer than `limit_request_field_size` (name and value), or all
  of them above `max_header_bytes`: 431. Nothing past the limit is kept;
- headers not complete within `header_timeout` (from the connection, or from the first byte
  of a request on a kept-alive connection): 408, and the connection is closed;
- a body not complete within `body_timeout` of its headers: the connection is closed (the
  app's `receive` gets `http.disconnect`).

Each answer is a problem+json document with `Connection: close`; the parser stops at once.

And one thing uvicorn does not do: a request whose client closes the connection before any
answer has started is cancelled (uvicorn only tells an app that reads its `receive`, which a
handler waiting on the database never does: a search whose client had gone kept running to
its end, in the worker and in PostgreSQL). Responses that handle a departure themselves opt
out (app.lifecycle.WATCHES_DISCONNECT); the edge records the request as 499.
The httptools protocol is kept (its parser is the fast one); nothing else is changed."""

from __future__ import annotations

import asyncio
import contextvars
import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from app.config import HttpSettings, Settings
from app.lifecycle import CLIENT_GONE, WATCHES_DISCONNECT


@dataclass(frozen=True, slots=True)
class HttpLimits:
    limit_request_line: int  # 0: no limit (gunicorn's meaning)
    limit_request_fields: int
    limit_request_field_size: int
    max_header_bytes: int
    header_timeout: float
    body_timeout: float

    @classmethod
    def of(
        cls,
        http: HttpSettings,
        *,
        line: int | None = None,
        fields: int | None = None,
        field_size: int | None = None,
    ) -> HttpLimits:
        """The limits of the settings; under gunicorn its own three come from its
        configuration (GUNICORN_CMD_ARGS may change them)."""
        return cls(
            limit_request_line=http.limit_request_line if line is None else line,
            limit_request_fields=http.limit_request_fields if fields is None else fields,
            limit_request_field_size=(
                http.limit_request_field_size if field_size is None else field_size
            ),
            max_header_bytes=http.max_header_bytes,
            header_timeout=http.header_timeout,
            body_timeout=http.body_timeout,
        )


class _Refused(Exception):
    """Raised from a parser callback: httptools stops parsing and re-raises it from
    feed_data (as HttpParserCallbackError, its cause)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def refusal(status: int, detail: str) -> bytes:
    """A complete HTTP/1.1 response that ends the connection."""
    body = json.dumps(
        {
            "type": "about:blank",
            "title": HTTPStatus(status).phrase,
            "status": status,
            "detail": detail,
        },
        separators=(",", ":"),
    ).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "content-type: application/problem+json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    limits: HttpLimits = HttpLimits.of(HttpSettings())

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._url_bytes = 0
        self._header_count = 0
        self._header_bytes = 0
        self._reading_body = False
        # Bytes of header chunks not yet parsed into fields: httptools keeps a field that
        # spans chunks until it ends, so a field arriving forever would grow without bound.
        self._in_headers = True
        self._header_chunks = 0
        self._boundaries = 0  # parser events that start or end a part of a request
        # The cycle whose app task runs, and that task (one at a time: pipelined requests wait).
        self._running: tuple[RequestResponseCycle, asyncio.Task[None]] | None = None

    @classmethod
    def with_limits(cls, limits: HttpLimits) -> type[BoundedHttpToolsProtocol]:
        """The protocol class uvicorn instantiates per connection, with these limits."""
        return type("BoundedHttpToolsProtocol", (cls,), {"limits": limits})

    # --- deadlines ----------------------------------------------------------------------

    def _arm(self, seconds: float, expired: Any) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_too_slow(self) -> None:
        self._deadline = None
        detail = f"the request headers took longer than {self.limits.header_timeout:g}s"
        self._refuse(_Refused(408, detail))

    def _body_too_slow(self) -> None:
        self._deadline = None
        self.logger.info("closing a connection whose body took over %ss", self.limits.body_timeout)
        self.transport.close()

    def _refuse(self, refused: _Refused) -> None:
        self._disarm()
        if self.transport.is_closing():
            return
        # Answer unless a response to an earlier request on this connection is still going
        # out (it would be cut into); either way the connection ends.
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(refusal(refused.status, refused.detail))
        self.transport.close()

    # --- the connection -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.limits.header_timeout, self._headers_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
        running, self._running = self._running, None
        if running is None:
            return
        cycle, task = running
        if cycle.response_started or task.done() or cycle.scope.get(WATCHES_DISCONNECT):
            return
        cycle.scope[CLIENT_GONE] = True  # type: ignore[literal-required]
        task.cancel()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        # uvicorn's, keeping the task (uvicorn adds it to a set shared by all connections).
        if self.config.reset_contextvars:
            task = self.loop.create_task(cycle.run_asgi(app), context=contextvars.Context())
        else:
            task = self.loop.create_task(cycle.run_asgi(app))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)
        self._running = (cycle, task)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        boundaries = self._boundaries
        try:
            self.parser.feed_data(data)
        except Exception as error:
            cause = error.__cause__ or error.__context__
            if isinstance(cause, _Refused):
                self._refuse(cause)
                return
            # Everything else as uvicorn does it (400 for a malformed request, upgrades).
            self._feed_failed(error)
            return
        if self._in_headers and self._boundaries == boundaries:
            # The whole chunk was request line and headers, still incomplete.
            self._header_chunks += len(data)
            limits = self.limits
            if self._header_chunks > limits.limit_request_line + limits.max_header_bytes:
                self._refuse(
                    _Refused(431, f"the header fields exceed {limits.max_header_bytes} bytes")
                )

    def _feed_failed(self, error: Exception) -> None:
        import httptools

        if isinstance(error, httptools.HttpParserUpgrade):
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if isinstance(error, httptools.HttpParserError):
            self.logger.warning("Invalid HTTP request received.")
            self._refuse(_Refused(400, "the request is not valid HTTP/1.1"))
            return
        raise error

    # --- parser callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._url_bytes = self._header_count = self._header_bytes = self._header_chunks = 0
        self._reading_body = False
        self._in_headers = True
        self._boundaries += 1
        if self._deadline is None:  # a request on a kept-alive connection
            self._arm(self.limits.header_timeout, self._headers_too_slow)

    def on_url(self, url: bytes) -> None:
        self._url_bytes += len(url)
        limit = self.limits.limit_request_line
        if limit and self._url_bytes > limit:
            raise _Refused(414, f"the request target is longer than {limit} bytes")
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self.limits
        size = len(name) + len(value)
        self._header_count += 1
        self._header_bytes += size
        if limits.limit_request_fields and self._header_count > limits.limit_request_fields:
            raise _Refused(431, f"more than {limits.limit_request_fields} header fields")
        if limits.limit_request_field_size and size > limits.limit_request_field_size:
            raise _Refused(
                431, f"a header field is longer than {limits.limit_request_field_size} bytes"
            )
        if self._header_bytes > limits.max_header_bytes:
            raise _Refused(431, f"the header fields exceed {limits.max_header_bytes} bytes")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        self._in_headers = False
        self._boundaries += 1
        super().on_headers_complete()
        if self._expects_body():
            self._reading_body = True
            self._arm(self.limits.body_timeout, self._body_too_slow)

    def on_message_complete(self) -> None:
        if self._reading_body:
            self._reading_body = False
            self._disarm()
        self._in_headers, self._header_chunks = True, 0  # what follows is the next request
        self._boundaries += 1
        super().on_message_complete()

    def _expects_body(self) -> bool:
        for name, value in self.headers:
            if name == b"content-length":
                return value.strip() not in (b"0", b"")
            if name == b"transfer-encoding":
                return True
        return False


def __getattr__(name: str) -> Any:
    """`app.protocol:FromEnvironment` (what `serve --reload` names, since uvicorn imports the
    protocol again in its reloading process): the limits of the settings in the environment,
    read when uvicorn loads it."""
    if name == "FromEnvironment":
        return BoundedHttpToolsProtocol.with_limits(HttpLimits.of(Settings().server.http))
    raise AttributeError(name)
