"""Responses the routes build themselves: a model made from the service's data is encoded
once, by its own serializer. Returned from a route declared with `response_model` (for the
document), it skips FastAPI's second pass (validate the returned object, then encode)."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel
from starlette.responses import Response


class ModelResponse(Response):
    media_type = "application/json"

    def __init__(
        self, model: BaseModel, status_code: int = 200, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(model.__pydantic_serializer__.to_json(model), status_code, headers)
