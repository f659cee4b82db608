"""Every error leaves as application/problem+json (RFC 9457); no stack trace reaches a client."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from app.api.etags import etag
from app.api.openai_errors import OPENAI_PREFIXES, openai_error
from app.api.schemas import NO_NUL, NUL_MESSAGE, UNICODE_MESSAGE
from app.domain import errors
from app.domain.errors import DatabaseUnavailable, SchemaNotReady
from app.providers.base import ProviderError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


_PLAIN = {errors.NotFound: 404, errors.PreconditionRequired: 428, errors.GenerationEnded: 409}


def status_for(error: BaseException, retry_after: int = 2) -> tuple[int, dict[str, str]]:
    """The HTTP status and headers for an error, wherever it is rendered: problem+json, an
    OpenAI error object, or an SSE error event (the one mapping in the app)."""
    match error:
        case HTTPException():
            return error.status_code, dict(error.headers or {})
        case errors.NotFound() | errors.PreconditionRequired() | errors.GenerationEnded():
            return next(code for kind, code in _PLAIN.items() if isinstance(error, kind)), {}
        case errors.PreconditionFailed():
            version = error.current_version
            return 412, ({"ETag": etag(version)} if version else {})
        case errors.InvalidCursor():
            return 400, {}
        case errors.IdempotencyKeyReused() | errors.InvalidInput():
            return 422, {}
        case errors.IdempotencyKeyInProgress():
            return 409, {"Retry-After": str(retry_after)}
        case errors.Overloaded():
            return 503, {"Retry-After": str(error.retry_after)}
        case errors.RateLimited():
            return 429, dict(error.headers)
        case errors.StreamLimitExceeded():
            return 504, {}
        case errors.ServiceError():
            return 400, {}
        case ProviderError():
            return _upstream_status(error)
        case DatabaseUnavailable():
            return 503, {"Retry-After": str(retry_after)}
    return 500, {}


def _upstream_status(error: ProviderError) -> tuple[int, dict[str, str]]:
    if error.kind == "rate_limited":
        if error.retry_after is None:
            return 429, {}
        return 429, {"Retry-After": str(max(1, round(error.retry_after)))}
    if error.kind == "timeout":
        return 504, {}
    if error.kind == "rejected" and error.status in (400, 404, 413, 422):
        return error.status or 400, {}
    return 502, {}


def detail_for(error: BaseException) -> str:
    """What the client may read about an error (never internals)."""
    match error:
        case errors.ServiceError() | ProviderError():
            return error.detail
        case HTTPException():
            return str(error.detail)
        case SchemaNotReady():
            return str(error)
        case DatabaseUnavailable():
            return "the database is unavailable; retry later"
    return "internal error"


def problem_body(status: int, detail: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
    }
    if detail:
        body["detail"] = detail
    body.update({key: value for key, value in extra.items() if value is not None})
    return body


def problem_response(
    status: int,
    detail: str | None = None,
    *,
    instance: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> Response:
    body = problem_body(status, detail, instance=instance, **extra)
    return Response(
        json.dumps(body, separators=(",", ":"), default=str),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=dict(headers or {}),
    )


def _location(loc: Sequence[Any]) -> str:
    """The field's dotted path inside its location; empty when the error is about the whole
    body (naming it `body` would read as a property called "body")."""
    parts = [str(part) for part in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts)


def validation_errors(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]]]:
    items: list[dict[str, Any]] = []
    for error in exc.errors():
        loc = list(error.get("loc", ()))
        message = error.get("msg", "invalid")
        if (error.get("ctx") or {}).get("pattern") == NO_NUL:
            message = NUL_MESSAGE  # say what is wrong, not which regular expression failed
        elif error.get("type") == "string_unicode":
            message = UNICODE_MESSAGE
        entry: dict[str, Any] = {
            "location": loc[0] if loc else "body",
            "field": _location(loc),
            "message": message,
            "type": error.get("type", "value_error"),
        }
        items.append(entry)
    if not items:
        return "request is not valid", items
    first = items[0]
    if first["type"] == "json_invalid":
        # FastAPI puts the character offset where a field name goes: name both apart.
        ctx = exc.errors()[0].get("ctx", {}) or {}
        reason = ctx.get("error", "invalid JSON")
        position = int(first["field"]) if str(first["field"]).isdigit() else None
        first.update(field="", position=position)
        where = f" at character {position}" if position is not None else ""
        return f"request body is not valid JSON: {reason}{where}", items
    subject = first["field"] or f"request {first['location']}"
    summary = f"{subject}: {first['message']}"
    more = f" (and {len(items) - 1} more)" if len(items) > 1 else ""
    return summary + more, items


UNSUPPORTED_BODY = "the request body must be JSON (Content-Type: application/json)"


def not_json(request: Request, exc: RequestValidationError) -> bool:
    """A body the route wants as JSON came with another media type: 415, not a 422 about
    dictionaries."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    is_json = media == "application/json" or media.endswith("+json")
    body_errors = [e for e in exc.errors() if tuple(e.get("loc", ()))[:1] == ("body",)]
    return bool(body_errors) and not is_json and request.method in ("POST", "PUT", "PATCH")


def install(app: FastAPI, *, retry_after_seconds: int) -> None:
    async def on_error(request: Request, exc: Exception) -> Response:
        status, headers = status_for(exc, retry_after_seconds)
        if request.url.path.startswith(OPENAI_PREFIXES):
            # Under the OpenAI-compatible paths even a routing error comes in OpenAI's shape.
            return openai_error(status, detail_for(exc), headers=headers)
        if status == 405:
            headers["Allow"] = ", ".join(allowed_methods(request.app, request.url.path))
        details = None
        if isinstance(exc, errors.InvalidInput):
            details = [{"location": exc.location, "field": exc.field, "message": exc.detail}]
        # Whether a write that failed this way may have been stored: "not-applied" (safe to
        # retry) or "unknown" (the commit was sent; retry only with an Idempotency-Key).
        outcome = exc.outcome if isinstance(exc, DatabaseUnavailable) else None
        return problem_response(
            status,
            detail_for(exc) or None,
            instance=request.url.path,
            headers=headers,
            errors=details,
            outcome=outcome,
        )

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        if not_json(request, exc):
            return problem_response(415, UNSUPPORTED_BODY, instance=request.url.path)
        detail, items = validation_errors(exc)
        return problem_response(422, detail, instance=request.url.path, errors=items)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return problem_response(500, "internal error", instance=request.url.path)

    app.add_exception_handler(HTTPException, on_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(errors.ServiceError, on_error)
    app.add_exception_handler(DatabaseUnavailable, on_error)
    app.add_exception_handler(Exception, on_unexpected)


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods the document lists for the resource at `path` (for a 405's Allow header):
    every route of the path, not only the first one the router tried."""
    templates = getattr(app.state, "allow_templates", None)
    if templates is None:
        templates = app.state.allow_templates = [
            (re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"), set(operations))
            for template, operations in app.openapi().get("paths", {}).items()
        ]
    methods: set[str] = set()
    literal = [
        ops for pattern, ops in templates if "[^/]+" not in pattern.pattern and pattern.match(path)
    ]
    for operations in literal or [ops for pattern, ops in templates if pattern.match(path)]:
        methods |= {m.upper() for m in operations}
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)
