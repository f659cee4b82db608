"""Pure ASGI middleware (no BaseHTTPMiddleware: it buffers streams and costs throughput).

Each replaces a maintained equivalent for a reason measured against it:
- BodySizeLimit, not FastAPI's `max_body_size` (Starlette's RequestBodyLimitMiddleware):
  with it, a body whose Content-Length is over the limit is answered `text/plain` "Content Too
  Large" by Starlette itself, outside the app's handlers, breaking the problem+json contract
  (tests/test_items_api.py::test_body_over_limit_is_413 fails with it swapped in).
- HostAllowlist, not Starlette's TrustedHostMiddleware: that one answers `text/plain` too, and
  cannot let the probe paths through whatever the Host (kubelet probes send the pod IP).
- HeadAsGet: FastAPI's routes do not answer HEAD where they answer GET (Starlette's own
  routes do); no library adds it to FastAPI's."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api import docs
from app.api.problems import BodyTooLarge, problem_response
from app.probes import PROBE_PATHS


class BodySizeLimit:
    """Refuse bodies above `limit` bytes with 413: up front from Content-Length, or while
    streaming for chunked uploads, before the app has acted on a partial body."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    response = problem_response(400, "Content-Length is not a number")
                    await response(scope, receive, send)
                    return
                if declared > self.limit:
                    response = problem_response(413, str(BodyTooLarge(self.limit).detail))
                    await response(scope, receive, send)
                    return
                break
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited_receive, send)


def route_path(scope: Scope) -> str:
    """The path the app routes on: behind a root path (ROOT_PATH, a proxy mounting the app
    under a prefix) uvicorn puts the prefix into `path` as well; probes and docs are matched
    without it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class HardeningHeaders:
    """The headers every response gets (the edge layer adds them): the API serves JSON and
    event streams; only the self-hosted docs pages need scripts and styles."""

    def __init__(self, hsts_seconds: int = 0) -> None:
        common = [
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"no-referrer"),
            (b"cross-origin-opener-policy", b"same-origin"),
        ]
        if hsts_seconds:
            common.append((b"strict-transport-security", f"max-age={hsts_seconds}".encode()))
        strict = b"default-src 'none'; frame-ancestors 'none'"
        self.api = [*common, (b"content-security-policy", strict)]
        self.docs = [
            *common,
            (
                b"content-security-policy",
                b"default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' "
                b"'unsafe-inline'; img-src 'self' data:; connect-src 'self'; worker-src blob:; "
                b"frame-ancestors 'none'",
            ),
        ]

    def for_path(self, path: str) -> list[tuple[bytes, bytes]]:
        return self.docs if path.startswith(docs.PATHS) else self.api


class HostAllowlist:
    """Pure ASGI: requests whose Host is not in `allowed` get 400, except the probe paths,
    which answer whatever the Host (kubelet probes send the pod IP, `helm test` the Service
    name, Prometheus the target address). Entries: exact hosts or `*.domain`; `*` is any."""

    def __init__(self, app: ASGIApp, allowed: list[str]) -> None:
        self.app = app
        self.any = "*" in allowed
        self.exact = frozenset(host.lower() for host in allowed if not host.startswith("*."))
        self.suffixes = tuple(host[1:].lower() for host in allowed if host.startswith("*."))

    def _allowed(self, host: str) -> bool:
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.lower()
        return self.any or name in self.exact or name.endswith(self.suffixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
        if self._allowed(host):
            await self.app(scope, receive, send)
            return
        response = problem_response(400, "invalid Host header")
        await response(scope, receive, send)


class HeadAsGet:
    """Pure ASGI: HEAD is served wherever GET is (RFC 9110 9.3.2), as the GET with the same
    headers and no body. The OpenAPI document lists the GET operations only."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        started = False

        async def headers_only(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                await send(message)
            elif message["type"] == "http.response.body" and started:
                if not message.get("more_body", False):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                await send(message)

        # In place, so that the layers outside see the route the GET resolved to.
        scope["method"] = "GET"
        await self.app(scope, receive, headers_only)
