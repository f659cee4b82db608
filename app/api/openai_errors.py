"""OpenAI's error object (`{"error": {"message", "type", "param", "code"}}`), the shape every
error takes under the OpenAI-compatible paths, so OpenAI's client libraries parse it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse, Response

from app.domain import errors

# The paths that answer errors in this shape.
OPENAI_PREFIXES = ("/v1/chat/", "/v1/models")

_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "insufficient_scope"),
    404: ("invalid_request_error", "not_found"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    422: ("invalid_request_error", None),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    502: ("api_error", "upstream_error"),
    503: ("api_error", "overloaded"),
    504: ("api_error", "upstream_timeout"),
}


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind, default_code = _TYPES.get(status, ("api_error", None))
    return {
        "error": {"message": message, "type": kind, "param": param, "code": code or default_code}
    }


def openai_error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    return JSONResponse(
        error_body(status, message, param, code), status_code=status, headers=dict(headers or {})
    )


def code_for(error: BaseException) -> str | None:
    """OpenAI's own code where it has one for the error (clients match on it)."""
    return "model_not_found" if isinstance(error, errors.UnknownModel) else None
