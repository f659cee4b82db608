"""Process lifecycle: lets request handlers and readiness know the moment shutdown begins
(SIGTERM), long before the server's lifespan shutdown runs after connections drain."""

from __future__ import annotations

import asyncio


class Lifecycle:
    def __init__(self) -> None:
        self._shutting_down = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called from the lifespan, on the loop that serves requests."""
        self._loop = loop
        self._event = asyncio.Event()
        if self._shutting_down:
            self._event.set()

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def begin_shutdown(self) -> None:
        """Safe to call from a signal handler: only flips a flag and pokes the loop."""
        self._shutting_down = True
        if self._loop is not None and self._event is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._event.set)

    async def wait(self) -> None:
        if self._event is None:
            raise RuntimeError("lifecycle is not bound to a running loop")
        await self._event.wait()


# One per process: the gunicorn worker's signal handler and the app share it.
process_lifecycle = Lifecycle()


# A request's end when its client leaves, agreed between the server's protocol
# (app.protocol) and the app through the ASGI scope: the protocol cancels a request whose
# client closed the connection before any answer started (nothing it computes can reach
# anyone, and its database work stops), marking the scope with CLIENT_GONE first so the edge
# records a 499; a response that handles its client's departure itself (an SSE stream whose
# generation goes on, an export) marks the scope with WATCHES_DISCONNECT and is left alone.
CLIENT_GONE = "itemstream.client_gone"
WATCHES_DISCONNECT = "itemstream.watches_disconnect"
