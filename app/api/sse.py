"""The Server-Sent Events wire format, from FastAPI's encoder (`fastapi.sse`), which splits data
on every line terminator the spec knows (`\\n`, `\\r\\n`, `\\r`)."""

from __future__ import annotations

import json
from typing import Any

from fastapi.sse import format_sse_event


def sse_event(data: Any, *, event: str | None = None, event_id: str | None = None) -> bytes:
    """One event: `data` as JSON (a str as it is, e.g. OpenAI's `[DONE]`)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return format_sse_event(data_str=payload, event=event, id=event_id)
