"""Every error leaves as application/problem+json (RFC 9457); no stack trace reaches a client."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from app.db.engine import DatabaseUnavailable
from app.services import errors

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


def problem_response(
    status: int,
    detail: str | None = None,
    *,
    instance: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> Response:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
    }
    if detail:
        body["detail"] = detail
    if instance:
        body["instance"] = instance
    body.update({key: value for key, value in extra.items() if value is not None})
    return Response(
        json.dumps(body, separators=(",", ":"), default=str),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=dict(headers or {}),
    )


def _location(loc: Sequence[Any]) -> str:
    parts = [str(part) for part in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts
    return ".".join(parts)


def validation_errors(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]]]:
    items: list[dict[str, Any]] = []
    for error in exc.errors():
        loc = list(error.get("loc", ()))
        entry: dict[str, Any] = {
            "location": loc[0] if loc else "body",
            "field": _location(loc),
            "message": error.get("msg", "invalid"),
            "type": error.get("type", "value_error"),
        }
        items.append(entry)
    if not items:
        return "request is not valid", items
    first = items[0]
    if first["type"] == "json_invalid":
        ctx = exc.errors()[0].get("ctx", {}) or {}
        reason = ctx.get("error", "invalid JSON")
        return f"request body is not valid JSON: {reason} (at {first['field'] or 'body'})", items
    summary = f"{first['field']}: {first['message']}" if first["field"] else first["message"]
    more = f" (and {len(items) - 1} more)" if len(items) > 1 else ""
    return summary + more, items


def install(app: FastAPI, *, retry_after_seconds: int) -> None:
    retry_after = {"Retry-After": str(retry_after_seconds)}

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return problem_response(
            exc.status_code,
            str(exc.detail) if exc.detail else None,
            instance=request.url.path,
            headers=exc.headers,
        )

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        detail, items = validation_errors(exc)
        return problem_response(422, detail, instance=request.url.path, errors=items)

    async def on_service(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, errors.ServiceError)
        path = request.url.path
        match exc:
            case errors.NotFound():
                return problem_response(404, exc.detail, instance=path)
            case errors.PreconditionFailed():
                headers = {"ETag": f'"{exc.current_version}"'} if exc.current_version else None
                return problem_response(412, exc.detail, instance=path, headers=headers)
            case errors.PreconditionRequired():
                return problem_response(428, exc.detail, instance=path)
            case errors.IdempotencyKeyReused():
                return problem_response(422, exc.detail, instance=path)
            case errors.IdempotencyKeyInProgress():
                return problem_response(409, exc.detail, instance=path, headers=retry_after)
            case errors.InvalidQuery():
                error = {"location": "query", "field": exc.parameter, "message": exc.detail}
                return problem_response(422, exc.detail, instance=path, errors=[error])
            case errors.InvalidInput():
                error = {"location": "body", "field": exc.field, "message": exc.detail}
                return problem_response(422, exc.detail, instance=path, errors=[error])
            case errors.Conflict():
                return problem_response(409, exc.detail, instance=path)
            case errors.Overloaded():
                headers = {"Retry-After": str(exc.retry_after)}
                return problem_response(503, exc.detail, instance=path, headers=headers)
            case errors.RateLimited():
                return problem_response(429, exc.detail, instance=path, headers=exc.headers)
            case errors.StreamLimitExceeded():
                return problem_response(504, exc.detail, instance=path)
        return problem_response(400, exc.detail, instance=path)

    async def on_unavailable(request: Request, exc: Exception) -> Response:
        return problem_response(
            503,
            "the database is unavailable; retry later",
            instance=request.url.path,
            headers=retry_after,
        )

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return problem_response(500, "internal error", instance=request.url.path)

    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(errors.ServiceError, on_service)
    app.add_exception_handler(DatabaseUnavailable, on_unavailable)
    app.add_exception_handler(Exception, on_unexpected)
