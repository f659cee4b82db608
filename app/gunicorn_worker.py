"""The uvicorn worker class, plus what gunicorn's cannot do: tell the app the moment shutdown
starts (readiness goes false, open streams get their final event), instead of only after every
connection has drained; and read requests within limits (app.protocol), gunicorn's own
`limit_request_*` included, which only its own parser would apply."""

from __future__ import annotations

import asyncio
import signal
import sys
from types import FrameType
from typing import Any, ClassVar

from gunicorn.arbiter import Arbiter
from uvicorn import Server
from uvicorn_worker import UvicornWorker

from app.config import SHUTDOWN_RESERVE_SECONDS, Settings
from app.lifecycle import process_lifecycle
from app.protocol import BoundedHttpToolsProtocol, HttpLimits


class _Server(Server):
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        process_lifecycle.begin_shutdown()
        super().handle_exit(sig, frame)


class Worker(UvicornWorker):  # type: ignore[misc]
    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {"loop": "auto", "lifespan": "on"}

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        graceful = int(self.cfg.graceful_timeout)
        self.config.timeout_graceful_shutdown = max(1, graceful - SHUTDOWN_RESERVE_SECONDS)
        settings = Settings()
        http = settings.server.http
        self.config.http = BoundedHttpToolsProtocol.with_limits(
            HttpLimits.of(
                http,
                line=self.cfg.limit_request_line,
                fields=self.cfg.limit_request_fields,
                field_size=self.cfg.limit_request_field_size,
            )
        )
        self.config.server_header = http.server_header
        self.config.root_path = settings.server.root_path

    async def _serve(self) -> None:
        # Same as UvicornWorker._serve, with the Server subclass above, and SIGQUIT (what the
        # master sends its workers on SIGINT or SIGQUIT) telling the server to stop: uvicorn-
        # worker's own handler only marks the gunicorn worker dead, which the uvicorn server
        # never reads, so the master waited its graceful timeout and then SIGKILLed them.
        self.config.app = self.wsgi
        server = _Server(config=self.config)
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGQUIT, server.handle_exit, signal.SIGQUIT, None
        )
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
