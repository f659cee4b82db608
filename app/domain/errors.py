"""Domain errors. The API layer maps each to an HTTP status; nothing here knows about HTTP
or about a driver: the database layer raises these."""

from __future__ import annotations

from typing import Literal


class ServiceError(Exception):
    """Base class: `detail` is safe to show to the client."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(ServiceError):
    pass


class UnknownModel(NotFound):
    """A model this deployment does not serve (not in LLM_MODELS)."""


class PreconditionFailed(ServiceError):
    """If-Match named a version the resource is no longer at."""

    def __init__(self, detail: str, current_version: int | None = None) -> None:
        super().__init__(detail)
        self.current_version = current_version


class PreconditionRequired(ServiceError):
    """The deployment requires If-Match on writes and the request had none."""


class IdempotencyKeyReused(ServiceError):
    """The key was first used with a different request body."""


class IdempotencyKeyInProgress(ServiceError):
    """Another request with this key has not finished."""


class InvalidInput(ServiceError):
    """The request passed schema validation but breaks a rule or a deployment limit (e.g.
    prompt size). `field` and `location` say where."""

    def __init__(self, detail: str, field: str, location: str = "body") -> None:
        super().__init__(detail)
        self.field = field
        self.location = location


class InvalidQuery(InvalidInput):
    def __init__(self, detail: str, parameter: str) -> None:
        super().__init__(detail, parameter, "query")


class InvalidCursor(InvalidQuery):
    """A keyset cursor this service did not issue (forged, altered, or signed with a key no
    longer configured), or one for another query: start again without it."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, "cursor")


class Overloaded(ServiceError):
    """This process is at a capacity limit or shutting down; retry after `retry_after`."""

    def __init__(self, detail: str, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class StreamLimitExceeded(ServiceError):
    """A running stream hit the maximum duration."""


class GenerationEnded(ServiceError):
    """A generation ended without completing (failed or cancelled): what a resumed stream
    ends with, and what a running one ends with when it is cancelled from elsewhere."""


class RateLimited(ServiceError):
    """A caller's budget is used up. `headers` carry RateLimit / RateLimit-Policy."""

    def __init__(
        self, detail: str, retry_after: int, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
        self.headers = {"Retry-After": str(retry_after), **(headers or {})}


class AlreadyExists(ServiceError):
    """A unique rule refused the write (e.g. one running generation per Idempotency-Key)."""


# What a client can know about its write when the database failed under it: "not-applied"
# (the failure came before COMMIT was sent, so the transaction rolled back and a retry is safe)
# or "unknown" (COMMIT was sent and no answer came: retry only with an Idempotency-Key).
Outcome = Literal["not-applied", "unknown"]


class DatabaseUnavailable(Exception):
    """The database (or the pooler in front of it) cannot serve the request right now."""

    def __init__(self, detail: str, *, outcome: Outcome = "not-applied") -> None:
        super().__init__(detail)
        self.outcome: Outcome = outcome


class SchemaNotReady(DatabaseUnavailable):
    """A table the code needs does not exist: the migration has not run (503, not 500)."""
