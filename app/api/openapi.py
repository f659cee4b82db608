"""The OpenAPI document as the contract: FastAPI's generated document, completed with what the
service really answers. Every error a route can return is documented in the shape it comes in
(problem+json, or OpenAI's error object on the OpenAI-compatible routes), event streams
declare their events, and bearer tokens with the scope each operation needs."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, iter_route_contexts
from pydantic import BaseModel

from app.api.openai_errors import OPENAI_PREFIXES
from app.api.problems import PROBLEM_JSON
from app.config import Settings

# Why each status may come back (the problem's `detail` says more).
REASONS = {
    400: "A header, cursor or body that is not in its declared format",
    401: "No valid bearer token (when AUTH_MODE is not none)",
    403: "The token lacks the scope this operation needs",
    404: "No such resource",
    409: "A request with the same Idempotency-Key is still running",
    412: "If-Match names a version the item is no longer at",
    413: "The request body is larger than MAX_BODY_BYTES",
    415: "The request body is not application/json",
    422: "A parameter or field is invalid; `errors` names each one",
    428: "If-Match is required (REQUIRE_IF_MATCH)",
    429: "A rate limit was reached; see Retry-After and RateLimit",
    500: "An unexpected error (logged with its trace id; never a stack trace)",
    502: "The LLM upstream failed",
    503: "The database, or the stream capacity, is unavailable; see Retry-After",
    504: "The stream exceeded its time limit, or the upstream timed out",
}
ALWAYS = (401, 403, 429, 500)

OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def _sse_event(name: str | None, data: dict[str, Any] | None, with_id: bool = False) -> Any:
    properties: dict[str, Any] = {
        "data": {"type": "string", "contentMediaType": "application/json"}
        | ({"contentSchema": data} if data else {})
    }
    required = ["data"]
    if name is not None:
        properties["event"] = {"const": name}
        required.append("event")
    if with_id:
        properties["id"] = {"type": "string", "pattern": "^[0-9]+$"}
        required.append("id")
    return {"type": "object", "required": required, "properties": properties}


GENERATION_EVENTS = {
    "oneOf": [
        _sse_event(
            "generation",
            {
                "type": "object",
                "required": ["generation_id", "model", "replayed"],
                "properties": {
                    "generation_id": {"type": "string", "format": "uuid"},
                    "model": {"type": "string"},
                    "replayed": {"type": "boolean"},
                },
            },
        ),
        _sse_event(
            "token",
            {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}},
            with_id=True,
        ),
        _sse_event("done", {"type": "object"}),
        _sse_event("error", {"$ref": "#/components/schemas/Problem"}),
    ],
    "description": "`generation` first, `token` events (with ids), then `done` or `error`; "
    "`: ping` comments while the model is silent",
}
CHAT_EVENTS = {
    "anyOf": [
        {
            "type": "object",
            "required": ["data"],
            "properties": {"data": {"const": "[DONE]"}},
            "description": "the end of the stream",
        },
        _sse_event(None, {"$ref": "#/components/schemas/ChatCompletionChunk"}),
        _sse_event(None, OPENAI_ERROR),
    ]
}
CHAT_CHUNK = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string", "pattern": "^chatcmpl-[0-9a-f]{32}$"},
        "object": {"const": "chat.completion.chunk"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {"type": "array"},
        "usage": {"type": ["object", "null"]},
    },
}
CHAT_COMPLETION = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "id": {"type": "string", "pattern": "^chatcmpl-[0-9a-f]{32}$"},
        "object": {"const": "chat.completion"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {"type": "array", "minItems": 1},
        "usage": {
            "type": "object",
            "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
            "properties": {
                name: {"type": "integer", "minimum": 0}
                for name in ("prompt_tokens", "completion_tokens", "total_tokens")
            },
        },
    },
}


MODEL = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
    },
}
MODEL_LIST = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {
        "object": {"const": "list"},
        "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
    },
}


def _model_examples() -> dict[str, list[Any]]:
    """The examples the API's Pydantic models declare, by schema name."""
    found: dict[str, list[Any]] = {}
    pending = list(BaseModel.__subclasses__())
    while pending:
        model = pending.pop()
        pending.extend(model.__subclasses__())
        extra = model.model_config.get("json_schema_extra")
        if model.__module__.startswith("app.api") and isinstance(extra, dict):
            examples = extra.get("examples")
            if isinstance(examples, list):
                found[model.__name__] = examples
    return found


def _component_examples(settings: Settings) -> dict[str, list[Any]]:
    """Examples of the schemas written here (the Pydantic models carry their own)."""
    model = {"id": settings.llm.model, "object": "model", "created": 0, "owned_by": "itemstream"}
    completion_id = "chatcmpl-0f1e2d3c4b5a69788796a5b4c3d2e1f0"
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    examples = {
        "Model": model,
        "ModelList": {"object": "list", "data": [model]},
        "ChatCompletion": {
            "id": completion_id,
            "object": "chat.completion",
            "created": 1796051752,
            "model": settings.llm.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello there!"},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        },
        "ChatCompletionChunk": {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": 1796051752,
            "model": settings.llm.model,
            "choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}],
        },
        "OpenAIError": {
            "error": {
                "message": "messages: List should have at least 1 item after validation",
                "type": "invalid_request_error",
                "param": "messages",
                "code": None,
            }
        },
    }
    return {name: [example] for name, example in examples.items()}


GENERATION_STREAMS = ("/v1/items/{item_id}/generate", "/v1/generations/{generation_id}/events")
GENERATION_EXAMPLE = (
    "event: generation\n"
    'data: {"generation_id":"01a22d07-0c1e-7d2a-9b3f-5c6d7e8f9a0b","model":"itemstream-mock",'
    '"replayed":false}\n\n'
    'event: token\nid: 8\ndata: {"text":"A sturdy"}\n\n'
    "event: done\ndata: {}\n\n"
)
# Media types whose bodies are not JSON: their examples are the text on the wire.
TEXT_EXAMPLES = {
    **{(path, "text/event-stream"): GENERATION_EXAMPLE for path in GENERATION_STREAMS},
    ("/v1/chat/completions", "text/event-stream"): (
        'data: {"id":"chatcmpl-0f1e2d3c4b5a69788796a5b4c3d2e1f0","object":"chat.completion.chunk",'
        '"created":1796051752,"model":"itemstream-mock","choices":[{"index":0,'
        '"delta":{"content":"Hello"},"finish_reason":null}]}\n\n'
        "data: [DONE]\n\n"
    ),
    ("/v1/items/export", "application/x-ndjson"): (
        '{"id":"01a22d06-d5f4-7515-bb0a-3196063f3662","name":"Espresso cup",...}\n'
    ),
    ("/v1/items/export", "text/csv"): (
        "id,name,description,price,...\r\n"
        '01a22d06-d5f4-7515-bb0a-3196063f3662,Espresso cup,"Porcelain, 90 ml",12.50,...\r\n'
    ),
}


def _dependencies(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    for sub in dependant.dependencies:
        if sub.call is not None:
            yield sub.call
        yield from _dependencies(sub)


def required_scope(route: APIRoute) -> str | None:
    for call in _dependencies(route.dependant):
        scope = getattr(call, "required_scope", None)
        if scope is not None:
            return str(scope)
    return None


def install(app: FastAPI, settings: Settings) -> None:
    """Replace app.openapi with the completed document (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            app.openapi_schema = complete(document, app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def complete(document: dict[str, Any], app: FastAPI, settings: Settings) -> dict[str, Any]:
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)  # FastAPI's 422; the service sends problem+json
    schemas.pop("ValidationError", None)
    schemas["OpenAIError"] = OPENAI_ERROR
    schemas["ChatCompletion"] = CHAT_COMPLETION
    schemas["ChatCompletionChunk"] = CHAT_CHUNK
    schemas["Model"] = MODEL
    schemas["ModelList"] = MODEL_LIST
    # FastAPI drops every null from the document it builds, examples included (an example item
    # would lose `deleted_at: null` and break its own schema): put them back from the models.
    for name, examples in {**_model_examples(), **_component_examples(settings)}.items():
        if name in schemas:
            schemas[name] = {**schemas[name], "examples": examples}
    if settings.auth.mode != "none":
        components["securitySchemes"] = {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "JWT",
                "description": "A JWT from AUTH_ISSUER; each operation names the scope it needs",
            }
        }
    # The models a client may ask for are the deployment's (LLM_MODELS): the document names
    # them, so clients, the docs page and the fuzzer offer only those (any other is 404).
    models = settings.llm.served_models
    if "ChatCompletionRequest" in schemas:
        model = schemas["ChatCompletionRequest"]["properties"]["model"]
        model["enum"] = models
        model["description"] = "one of the models `/v1/models` lists; any other is 404"
    for parameter in (
        document.get("paths", {})
        .get("/v1/models/{model_id}", {})
        .get("get", {})
        .get("parameters", [])
    ):
        if parameter.get("name") == "model_id":
            parameter["schema"] = {**parameter.get("schema", {}), "enum": models}
    # FastAPI >= 0.16x keeps included routers as such; iter_route_contexts gives each route
    # with its full path.
    routes = {
        (method.lower(), context.path_format): context.original_route
        for context in iter_route_contexts(app.routes)
        if isinstance(context.original_route, APIRoute)
        for method in context.methods or ()
    }
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            route = routes.get((method, path))
            if route is not None:
                _complete_operation(operation, path, route, settings)
                _examples(operation, path, schemas)
    return document


def _complete_operation(
    operation: dict[str, Any], path: str, route: APIRoute, settings: Settings
) -> None:
    openai = path.startswith(OPENAI_PREFIXES)
    responses: dict[str, Any] = operation.setdefault("responses", {})
    codes = {int(code) for code in responses if code.isdigit() and int(code) >= 400}
    has_body = "requestBody" in operation
    content = operation.get("requestBody", {}).get("content", {})
    if "application/merge-patch+json" in content:
        # Documented as application/json, which clients send and every tool knows; the server
        # reads application/merge-patch+json (RFC 7396) the same way.
        content["application/json"] = content.pop("application/merge-patch+json")
    parameters = operation.get("parameters", [])
    for parameter in parameters:
        _not_null(parameter)
    if has_body or parameters:
        codes.add(422)
    if has_body:
        codes |= {400, 413, 415}  # 400: a body that is not even text
    if any(p.get("name") in ("if-match", "If-Match") for p in parameters):
        codes.add(400)
    if path.startswith("/v1/"):
        codes |= set(ALWAYS) | {503}
    if openai:
        codes |= {400, 404, 502, 504}
    for code in sorted(codes):
        media = "application/json" if openai else PROBLEM_JSON
        ref = "#/components/schemas/OpenAIError" if openai else "#/components/schemas/Problem"
        entry = responses.setdefault(str(code), {})
        entry["description"] = REASONS.get(code, entry.get("description", "Error"))
        entry["content"] = {media: {"schema": {"$ref": ref}}}
    _event_streams(operation, path)
    scope = required_scope(route)
    if scope is not None:
        description = operation.get("description", "")
        operation["description"] = f"{description}\n\nScope: `{scope}`.".strip()
        if settings.auth.mode != "none":
            anonymous = settings.auth.anonymous_read and scope == "items:read"
            operation["security"] = ([{}] if anonymous else []) + [{"bearer": []}]
            operation["x-required-scope"] = scope


def _not_null(parameter: dict[str, Any]) -> None:
    """A query or header parameter is present or absent, never JSON null: FastAPI's
    `X | None` adds a null branch that would invite clients (and fuzzers) to send "null"."""
    schema = parameter.get("schema", {})
    branches = schema.get("anyOf")
    if branches:
        kept = [b for b in branches if b.get("type") != "null"]
        if len(kept) == 1:
            schema.pop("anyOf")
            schema.update(kept[0])
        else:
            schema["anyOf"] = kept


def _event_streams(operation: dict[str, Any], path: str) -> None:
    ok = operation.get("responses", {}).get("200", {})
    if path in GENERATION_STREAMS:
        ok["content"] = {"text/event-stream": {"itemSchema": copy.deepcopy(GENERATION_EVENTS)}}
    elif path == "/v1/models":
        ok["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/ModelList"}}}
    elif path == "/v1/models/{model_id}":
        ok["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/Model"}}}
    elif path == "/v1/chat/completions":
        ok["description"] = "A chat completion, or with `stream: true` its chunks as events"
        ok["content"] = {
            "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletion"}},
            "text/event-stream": {"itemSchema": copy.deepcopy(CHAT_EVENTS)},
        }


def _examples(operation: dict[str, Any], path: str, schemas: dict[str, Any]) -> None:
    """Each request body and success response shows an example: its schema's first one, or
    for a text format the text on the wire."""
    bodies = [operation.get("requestBody", {})] + [
        response for code, response in operation.get("responses", {}).items() if code < "300"
    ]
    for body in bodies:
        for media_type, media in body.get("content", {}).items():
            if "example" in media:
                continue
            schema = media.get("schema", {})
            refs = [b.get("$ref", "") for b in [schema, *schema.get("anyOf", [])]]
            named = [schemas.get(ref.rsplit("/", 1)[-1], {}) for ref in refs if ref]
            examples = next((n["examples"] for n in named if n.get("examples")), None)
            if examples:
                media["example"] = examples[0]
            elif (path, media_type) in TEXT_EXAMPLES:
                media["example"] = TEXT_EXAMPLES[(path, media_type)]
