"""OpenAI-compatible chat completions, streaming (SSE) or not."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from app.api.deps import ServicesDep
from app.api.openai_compat import ChatCompletionRequest, ChunkFormat, OpenAIRoute, completion_body
from app.api.security import require
from app.api.streaming import EventStreamResponse
from app.security.principals import GENERATE, Principal
from app.telemetry import tracing

router = APIRouter(prefix="/v1", tags=["chat"], route_class=OpenAIRoute)


@router.post(
    "/chat/completions",
    summary="Create a chat completion (OpenAI-compatible)",
    description=(
        "The OpenAI Chat Completions API: `stream: true` answers with `chat.completion.chunk` "
        "Server-Sent Events ending in `data: [DONE]`, with heartbeat comments while the model "
        'is silent. Errors use OpenAI\'s `{"error": {...}}` shape. Every call is recorded '
        "as a generation."
    ),
    response_model=None,
)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    services: ServicesDep,
    caller: Annotated[Principal, require(GENERATE)],
) -> Response:
    run = await services.generations.start_chat(
        tuple(message.to_message() for message in body.messages),
        model=body.model,
        max_tokens=body.token_limit,
        temperature=body.temperature,
        headers=tracing.outgoing_headers(request.headers),
        principal=caller,
    )
    if body.stream:
        return EventStreamResponse(
            run,
            ChunkFormat(body.include_usage),
            heartbeat_seconds=services.settings.stream_heartbeat_seconds,
            drain_seconds=services.settings.stream_drain_seconds,
            lifecycle=services.lifecycle,
        )
    text = await services.generations.collect(run)
    return JSONResponse(completion_body(run, text))
