"""Item-grounded generation (SSE) and generation records."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Body, Header, Path, Query, Request

from app.api.access import require
from app.api.deps import ComponentsDep
from app.api.problems import PROBLEM_JSON, detail_for, problem_body, status_for
from app.api.routes.items import PROBLEMS, IdempotencyKey
from app.api.schemas import GenerateIn, GenerationOut, Problem
from app.api.sse import sse_event
from app.api.streaming import EventStreamResponse
from app.domain.errors import InvalidInput, NotFound
from app.domain.principal import GENERATE, READ, Principal
from app.services.generations import Finished, Run
from app.telemetry import tracing

router = APIRouter(prefix="/v1", tags=["generations"])


class ItemEventFormat:
    """`generation`, then `token` events (with ids), then `done` or `error`."""

    def opening(self, run: Run) -> bytes:
        return sse_event(
            {"generation_id": str(run.id), "model": run.model, "replayed": run.replayed},
            event="generation",
        )

    def text(self, run: Run, text: str, index: int) -> bytes:
        # The id is the count of characters sent so far: `Last-Event-ID` resumes after it.
        return sse_event({"text": text}, event="token", event_id=str(run.chars))

    def closing(self, run: Run, finished: Finished) -> bytes:
        generation = finished.generation
        return sse_event(
            {
                "generation_id": str(generation.id),
                "status": generation.status,
                "completion_tokens": generation.completion_tokens,
                "finish_reason": generation.finish_reason,
                "item_version": finished.item_version,
                "replayed": run.replayed,
            },
            event="done",
        )

    def failure(self, run: Run, error: Exception) -> bytes:
        status, _ = status_for(error)
        return sse_event(problem_body(status, detail_for(error)), event="error")

    def error_response(self, error: Exception) -> tuple[int, dict[str, str], bytes, str]:
        status, headers = status_for(error)
        body = json.dumps(problem_body(status, detail_for(error))).encode()
        return status, headers, body, PROBLEM_JSON


# How both generation streams are declared (openapi.py adds their events).
EVENT_STREAM: dict[str, Any] = {
    "response_class": EventStreamResponse,
    "status_code": 200,
    "responses": {
        200: {"content": {"text/event-stream": {}}},
        **{code: PROBLEMS.get(code, {"model": Problem}) for code in (404, 409, 422, 503)},
    },
}


@router.post(
    "/items/{item_id}/generate",
    summary="Stream a generated text about an item (SSE)",
    description=(
        "Streams `generation`, `token` (with event ids) and a final `done` event; on "
        "completion the text is stored on the item (`generated_text`, version + 1) exactly "
        "once. The generation runs to its end even if the client goes away; "
        "`GET /v1/generations/{id}/events` with `Last-Event-ID` resumes it (any worker or pod), "
        "`POST /v1/generations/{id}/cancel` cancels it. With an `Idempotency-Key`, repeating the "
        "request replays the completed "
        "generation instead of generating again (409 while it still runs). An upstream failure "
        "before the first token gets a real status (429, 502, 504); after it, an `error` event."
    ),
    **EVENT_STREAM,
)
async def generate_for_item(
    item_id: UUID,
    request: Request,
    components: ComponentsDep,
    caller: Annotated[Principal, require(GENERATE)],
    body: Annotated[GenerateIn | None, Body()] = None,
    idempotency_key: IdempotencyKey = None,
) -> EventStreamResponse:
    body = body or GenerateIn()
    run = await components.generations.start_for_item(
        caller,
        item_id,
        instructions=body.instructions,
        max_tokens=body.max_tokens,
        idempotency_key=idempotency_key,
        headers=tracing.outgoing_headers(request.headers),
    )
    return EventStreamResponse.configured(
        run,
        ItemEventFormat(),
        components.settings,
        components.lifecycle,
        headers={"Location": f"/v1/generations/{run.id}"},
        detach=True,
    )


GENERATION_ID = (
    r"^(chatcmpl-[0-9a-f]{32}|[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?"
    r"[0-9a-fA-F]{12})$"
)


def _generation_uuid(text: str) -> UUID:
    """A chat completion's id is its generation's id (`chatcmpl-<hex>`): either finds it.
    Anything else names no generation (404, like an unknown id)."""
    if re.fullmatch(GENERATION_ID, text) is None:
        raise NotFound(f"no generation {text[:80]!r}")
    return UUID(text.removeprefix("chatcmpl-"))


@router.get(
    "/generations/{generation_id}",
    summary="A recorded generation: outcome, tokens, timings and text",
    responses={404: PROBLEMS[404], 503: PROBLEMS[503]},
)
async def get_generation(
    generation_id: Annotated[
        str,
        Path(description="the generation's id, or a chat completion's id (`chatcmpl-...`)"),
    ],
    components: ComponentsDep,
    caller: Annotated[Principal, require(READ)],
) -> GenerationOut:
    generation = await components.generations.get(caller, _generation_uuid(generation_id))
    return GenerationOut.of(generation)


LAST_EVENT_ID = re.compile(r"^[0-9]{1,9}$")


def _resume_offset(header: str | None, query: str | None) -> int:
    value = header if header is not None else query
    if value is None or value == "":
        return 0
    if LAST_EVENT_ID.fullmatch(value) is None:
        where = "Last-Event-ID" if header is not None else "last_event_id"
        location = "header" if header is not None else "query"
        raise InvalidInput(
            f"{where} must be the id of a token event (a count of characters)", where, location
        )
    return int(value)


@router.get(
    "/generations/{generation_id}/events",
    summary="Resume a generation's event stream (SSE)",
    description=(
        "The events of `POST /v1/items/{id}/generate` after `Last-Event-ID` (the id of the "
        "last `token` event received; a browser's `EventSource` sends it when it reconnects, "
        "and `last_event_id` does the same for a first connection): a `generation` event, the "
        "text after that point as it is produced (the producing worker saves it every "
        "`STREAM_CHECKPOINT_SECONDS`, on any pod), then `done`, or `error` if the generation "
        "failed or was cancelled (409 if it ended so before anything was left to send). Never "
        "calls the model again."
    ),
    **EVENT_STREAM,
)
async def resume_generation(
    generation_id: Annotated[
        str, Path(description="the generation's id, or a chat completion's id (`chatcmpl-...`)")
    ],
    components: ComponentsDep,
    caller: Annotated[Principal, require(READ)],
    last_event_id_header: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            max_length=9,
            pattern=r"^[0-9]*$",
            description="the id of the last token event received",
        ),
    ] = None,
    last_event_id: Annotated[
        str | None,
        Query(max_length=9, pattern=r"^[0-9]*$", description="as Last-Event-ID"),
    ] = None,
) -> EventStreamResponse:
    after = _resume_offset(last_event_id_header, last_event_id)
    run = await components.generations.follow(caller, _generation_uuid(generation_id), after)
    return EventStreamResponse.configured(
        run,
        ItemEventFormat(),
        components.settings,
        components.lifecycle,
    )


@router.post(
    "/generations/{generation_id}/cancel",
    summary="Cancel a running generation",
    description=(
        "Marks a running generation `cancelled` at once; the worker producing it (on any pod) "
        "stops within `STREAM_CHECKPOINT_SECONDS` of its next token, and nothing is stored on "
        "the item. A generation that already ended is returned as it is."
    ),
    responses={404: PROBLEMS[404], 503: PROBLEMS[503]},
)
async def cancel_generation(
    generation_id: Annotated[str, Path(description="as for GET")],
    components: ComponentsDep,
    caller: Annotated[Principal, require(GENERATE)],
) -> GenerationOut:
    generation = await components.generations.cancel(caller, _generation_uuid(generation_id))
    return GenerationOut.of(generation)
