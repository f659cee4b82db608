"""What the services ask of the layers below them, as types."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

Writer = Callable[[bytes], Awaitable[None]]
"""Where an export writes its bytes: the HTTP response's send, awaited for backpressure."""
