"""OpenAI-compatible chat completions, streaming (SSE) or not."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from app.api.access import require
from app.api.deps import ComponentsDep
from app.api.openai_compat import (
    ChatCompletionRequest,
    ChunkFormat,
    OpenAIRoute,
    completion_body,
)
from app.api.streaming import EventStreamResponse
from app.domain.errors import UnknownModel
from app.domain.principal import GENERATE, Principal
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
    components: ComponentsDep,
    caller: Annotated[Principal, require(GENERATE)],
) -> Response:
    run = await components.generations.start_chat(
        caller,
        tuple(message.to_message() for message in body.messages),
        model=body.model,
        max_tokens=body.token_limit,
        temperature=body.temperature,
        headers=tracing.outgoing_headers(request.headers),
    )
    # The record of this completion (GET it; the completion's own id works there too).
    record = {"Location": f"/v1/generations/{run.id}"}
    if body.stream:
        return EventStreamResponse.configured(
            run,
            ChunkFormat(body.include_usage),
            components.settings,
            components.lifecycle,
            headers=record,
        )
    text = await components.generations.collect(run)
    return JSONResponse(completion_body(run, text), headers=record)


@router.get(
    "/models",
    summary="The models this service serves (OpenAI-compatible)",
    description=(
        "Many clients and UIs call it first. Lists exactly the models clients may ask for "
        "(`LLM_MODEL` and `LLM_MODELS`); any other is 404 `model_not_found`."
    ),
)
async def list_models(components: ComponentsDep) -> dict[str, Any]:
    return {"object": "list", "data": [_model(m) for m in components.settings.llm.served_models]}


@router.get(
    "/models/{model_id:path}",
    summary="One model (OpenAI-compatible)",
    responses={404: {"description": "No such model"}},
)
async def get_model(model_id: str, components: ComponentsDep) -> Response:
    if model_id not in components.generations.models:
        raise UnknownModel(f"The model '{model_id}' does not exist")
    return JSONResponse(_model(model_id))


def _model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "itemstream"}
