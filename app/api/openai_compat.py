"""The OpenAI Chat Completions wire format: request and response models, stream chunks, and
errors shaped as OpenAI sends them (`{"error": {"message", "type", "param", "code"}}`), so
the official client libraries work against this service unmodified."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    WithJsonSchema,
    field_validator,
)
from starlette.exceptions import HTTPException
from starlette.responses import Response

from app.api.openai_errors import code_for, error_body, openai_error
from app.api.problems import (
    UNSUPPORTED_BODY,
    detail_for,
    not_json,
    status_for,
    validation_errors,
)
from app.api.schemas import NO_NUL, Text, storable
from app.api.sse import sse_event
from app.domain import errors
from app.domain.errors import DatabaseUnavailable
from app.providers.base import Message, ProviderError
from app.services.generations import Finished, Run

log = logging.getLogger(__name__)


def _json_number(value: object) -> object:
    # JSON's numbers as JSON Schema reads them: true is not 1, "5" is not 5, 2.0 is an integer.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a JSON number")
    return value


def _json_int(value: object) -> object:
    value = _json_number(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Constraints before the validator, or the JSON schema gets "ge" instead of "minimum".
TokenCount = Annotated[int, Field(ge=1), BeforeValidator(_json_int)]
Temperature = Annotated[float, Field(ge=0, le=2), BeforeValidator(_json_number)]
OnlyOne = Annotated[int, Field(ge=1, le=1), BeforeValidator(_json_int)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: Annotated[str, WithJsonSchema({"type": "string", "pattern": NO_NUL})]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Annotated[
        str | list[TextPart] | None,
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string", "pattern": NO_NUL},
                    {"type": "array", "items": {"$ref": "#/components/schemas/TextPart"}},
                    {"type": "null"},
                ]
            }
        ),
    ] = None

    @field_validator("content")
    @classmethod
    def _storable(cls, content: str | list[TextPart] | None) -> str | list[TextPart] | None:
        # One check for both shapes (a union of constrained types would report the wrong one).
        parts = [content] if isinstance(content, str) else [p.text for p in content or []]
        for part in parts:
            storable(part)
        return content

    def to_message(self) -> Message:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return Message(self.role, content or "")


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class ChatCompletionRequest(BaseModel):
    # Clients send many optional parameters (top_p, user, seed, ...); unknown ones are ignored.
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "model": "itemstream-mock",
                    "messages": [{"role": "user", "content": "Say hello"}],
                    "max_tokens": 16,
                }
            ]
        },
    )

    model: Text = Field(min_length=1, max_length=200)
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)
    # Strict: JSON true is not a temperature, nor "5" a token count.
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: TokenCount | None = Field(None, description="capped at STREAM_MAX_TOKENS")
    max_completion_tokens: TokenCount | None = Field(None, description="capped likewise")
    temperature: Temperature | None = None
    n: OnlyOne = Field(1, description="only 1 is supported")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def completion_id(run: Run) -> str:
    return f"chatcmpl-{run.id.hex}"


def usage(run: Run) -> dict[str, int]:
    prompt = run.prompt_tokens or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": run.tokens,
        "total_tokens": prompt + run.tokens,
    }


def completion_body(run: Run, text: str) -> dict[str, Any]:
    return {
        "id": completion_id(run),
        "object": "chat.completion",
        "created": int(run.created.timestamp()),
        "model": run.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": run.finish_reason or "stop",
            }
        ],
        "usage": usage(run),
    }


class ChunkFormat:
    """`chat.completion.chunk` events ending with `data: [DONE]`."""

    def __init__(self, include_usage: bool) -> None:
        self.include_usage = include_usage

    def _chunk(self, run: Run, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": completion_id(run),
            "object": "chat.completion.chunk",
            "created": int(run.created.timestamp()),
            "model": run.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def opening(self, run: Run) -> bytes:
        return sse_event(self._chunk(run, {"role": "assistant", "content": ""}, None))

    def text(self, run: Run, text: str, index: int) -> bytes:
        return sse_event(self._chunk(run, {"content": text}, None))

    def closing(self, run: Run, finished: Finished) -> bytes:
        out = sse_event(self._chunk(run, {}, run.finish_reason or "stop"))
        if self.include_usage:
            last = self._chunk(run, {}, None)
            last["choices"] = []
            last["usage"] = usage(run)
            out += sse_event(last)
        return out + sse_event("[DONE]")

    def failure(self, run: Run, error: Exception) -> bytes:
        status, _ = status_for(error)
        return sse_event({"error": error_body(status, detail_for(error))["error"]})

    def error_response(self, error: Exception) -> tuple[int, dict[str, str], bytes, str]:
        status, headers = status_for(error)
        body = json.dumps(error_body(status, detail_for(error))).encode()
        return status, headers, body, "application/json"


class OpenAIRoute(APIRoute):
    """Routes whose errors use OpenAI's shape instead of problem+json."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                if not_json(request, exc):
                    return openai_error(415, UNSUPPORTED_BODY)
                detail, items = validation_errors(exc)
                field = items[0]["field"] if items else None
                return openai_error(400, detail, param=field or None)
            except (HTTPException, errors.ServiceError, ProviderError, DatabaseUnavailable) as exc:
                status, headers = status_for(exc)
                # OpenAI answers invalid requests with 400, where problem+json says 422.
                return openai_error(
                    400 if status == 422 else status,
                    detail_for(exc),
                    param=getattr(exc, "field", None),
                    code=code_for(exc),
                    headers=headers,
                )
            except Exception as exc:
                # Whatever else went wrong, OpenAI clients parse only their own error shape.
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                return openai_error(500, detail_for(exc))

        return handle
