"""Reading a Server-Sent Events response as a client does."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx


async def each_event(
    response: httpx.Response,
) -> AsyncIterator[tuple[str, str | None, dict[str, Any]]]:
    """(event, id, data) as they come."""
    event, event_id, data = "", None, ""
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data = line[5:].strip()
        elif line == "" and data:
            yield event, event_id, json.loads(data)
            event, event_id, data = "", None, ""
