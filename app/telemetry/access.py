"""Access log as pure ASGI middleware, placed inside the tracing middleware so that each line
carries the request's trace id. Logs the route template, never the query string or body."""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.probes import PROBE_PATHS

log = logging.getLogger("itemstream.access")


class AccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client sees if the app raises before responding

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            path = scope["path"]
            level = logging.DEBUG if path in PROBE_PATHS else logging.INFO
            if log.isEnabledFor(level):
                duration_ms = round((time.perf_counter() - started) * 1000, 2)
                method = scope["method"]
                principal = scope.get("state", {}).get("principal")
                fields = {
                    "method": method,
                    "route": template,
                    "path": path,
                    "status": status,
                    "duration_ms": duration_ms,
                }
                if principal is not None:  # the subject only, never the token
                    fields["principal"] = principal.subject
                log.log(
                    level,
                    "%s %s %s",
                    method,
                    template,
                    status,
                    extra={"http": fields},
                )
