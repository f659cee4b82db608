"""Real HTTP servers inside the test's event loop: the app under uvicorn, and a fake
OpenAI-compatible upstream that can be told how to misbehave."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from app.config import Settings
from app.lifecycle import Lifecycle
from app.main import create_app
from harness.processes import free_port


@asynccontextmanager
async def uvicorn_server(app: ASGIApp, port: int | None = None) -> AsyncIterator[str]:
    port = port or free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, lifespan="on", log_level="warning", loop="none"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 20
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("uvicorn stopped during start-up")
        if time.monotonic() > deadline:
            raise TimeoutError("uvicorn did not start")
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


@asynccontextmanager
async def running_app(settings: Settings, lifecycle: Lifecycle | None = None) -> AsyncIterator[str]:
    """The real app (lifespan and all) answering HTTP on a loopback port."""
    async with uvicorn_server(create_app(settings, lifecycle or Lifecycle())) as base:
        yield base


@dataclass
class UpstreamCall:
    model: str
    headers: dict[str, str]
    body: dict[str, Any]
    closed_at: float | None = None  # when the fake saw its client go away mid-stream
    completed: bool = False


@dataclass
class FakeUpstream:
    """Behaviour by model name:
    - `normal`: 5 tokens; `slow-first`: first token after `slow_seconds`;
    - `fail-500` / `fail-429`: error status (429 with Retry-After: 7);
    - `flaky`: 503 on the first request, then normal;
    - `break-after-2`: 2 tokens, then an error chunk; `cut-after-2`: 2 tokens, then EOF;
    - `endless`: a token every 50 ms until the client goes away."""

    # The models above, for LLM_MODELS (the service refuses models it does not offer).
    MODELS = "normal,slow-first,fail-500,fail-429,flaky,break-after-2,cut-after-2,endless"

    slow_seconds: float = 1.5
    calls: list[UpstreamCall] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self.handle, methods=["POST"])])

    async def handle(self, request: Request) -> Response:
        body = await request.json()
        model = body["model"]
        call = UpstreamCall(model, dict(request.headers), body)
        self.calls.append(call)
        if model == "fail-500" or (model == "flaky" and len(self.calls) == 1):
            status = 503 if model == "flaky" else 500
            return JSONResponse({"error": {"message": "model crashed"}}, status_code=status)
        if model == "fail-429":
            return JSONResponse(
                {"error": {"message": "slow down", "type": "rate_limit_error"}},
                status_code=429,
                headers={"Retry-After": "7"},
            )
        return StreamingResponse(self._stream(call), media_type="text/event-stream")

    async def _stream(self, call: UpstreamCall) -> AsyncIterator[bytes]:
        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            payload = {
                "id": "up-1",
                "object": "chat.completion.chunk",
                "model": call.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }
            return f"data: {json.dumps(payload)}\n\n".encode()

        try:
            yield chunk({"role": "assistant", "content": ""})
            if call.model == "slow-first":
                await asyncio.sleep(self.slow_seconds)
            count = 10**6 if call.model == "endless" else 5
            for index in range(count):
                if call.model.endswith("-after-2") and index == 2:
                    if call.model.startswith("break"):
                        yield b'data: {"error": {"message": "GPU fell over"}}\n\n'
                    return
                yield chunk({"content": f" tok{index}"})
                await asyncio.sleep(0.05 if call.model == "endless" else 0.001)
            yield chunk({}, "stop")
            usage = {"prompt_tokens": 3, "completion_tokens": count, "total_tokens": 3 + count}
            yield f"data: {json.dumps({'id': 'up-1', 'choices': [], 'usage': usage})}\n\n".encode()
            yield b"data: [DONE]\n\n"
            call.completed = True
        finally:
            if not call.completed:
                call.closed_at = time.monotonic()
                self.closed.set()


@asynccontextmanager
async def fake_upstream() -> AsyncIterator[tuple[FakeUpstream, str]]:
    upstream = FakeUpstream()
    async with uvicorn_server(upstream.app()) as base:
        yield upstream, base + "/v1"
