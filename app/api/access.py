"""Authentication, scopes and request rate limits as FastAPI dependencies.

Every protected route declares the scope it needs (`require(READ)`, or a dependency made with
`scoped()` such as app.api.deps.ItemsReader, which also hands over the service). The principal
is kept on the request (`request.state.principal`) for the access log, and its subject is set
on the request span. No token is ever logged."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Depends, HTTPException, Request
from opentelemetry import trace

from app.config import AuthSettings
from app.domain.errors import Overloaded, RateLimited
from app.domain.principal import ALL_SCOPES, READ, Principal
from app.security.ratelimit import RateLimitBackendDown, RateLimiter, headers_for
from app.security.tokens import InvalidToken, KeySourceUnavailable, TokenVerifier

log = logging.getLogger(__name__)
T = TypeVar("T")
REALM = 'Bearer realm="itemstream"'


class AccessControl:
    """Turns a request into a principal, or refuses it."""

    def __init__(
        self, auth: AuthSettings, verifier: TokenVerifier | None, limiter: RateLimiter | None
    ) -> None:
        self._mode = auth.mode
        self._anonymous_read = auth.anonymous_read
        self._admin_scope = auth.admin_scope
        self.verifier = verifier
        self.limiter = limiter

    async def principal(self, request: Request, scope: str) -> Principal:
        client = request.client.host if request.client else ""
        if self._mode == "none":
            return Principal("anonymous", ALL_SCOPES, anonymous=True, client=client)
        token = _bearer(request)
        if token is None:
            if self._anonymous_read and scope == READ:
                return Principal("anonymous", frozenset({READ}), anonymous=True, client=client)
            await self.refused(client)
            raise HTTPException(401, "a bearer token is required", {"WWW-Authenticate": REALM})
        assert self.verifier is not None
        try:
            verified = await self.verifier.verify(token)
        except InvalidToken as error:
            await self.refused(client)
            description = _header_text(error.detail)
            challenge = f'{REALM}, error="{error.error}", error_description="{description}"'
            raise HTTPException(401, error.detail, {"WWW-Authenticate": challenge}) from None
        except KeySourceUnavailable as error:
            log.warning("cannot verify tokens: %s", error)
            raise Overloaded("the identity provider's keys are unavailable", 5) from None
        return Principal(
            verified.subject,
            verified.scopes,
            client=client,
            tenant=verified.tenant,
            admin=self._admin_scope in verified.scopes,
        )

    async def refused(self, client: str) -> None:
        """Count a refused token or scope against the address's budget of refusals: past it
        the answer is 429 (a flood of bad tokens costs the flooder, not the verifier)."""
        if self.limiter is None:
            return
        try:
            decision = await self.limiter.auth_failed(client)
        except RateLimitBackendDown:
            return  # the refusal stands; a closed fail mode is for admissions, not refusals
        if not decision.allowed:
            raise RateLimited(
                "too many refused requests from this address",
                decision.retry_after,
                headers_for(decision),
            )

    async def check_rate(self, principal: Principal) -> None:
        if self.limiter is None:
            return
        try:
            decision = await self.limiter.hit(principal.rate_key)
        except RateLimitBackendDown:
            raise Overloaded("rate limiting is unavailable; retry shortly", 2) from None
        if not decision.allowed:
            raise RateLimited(
                "too many requests from this caller", decision.retry_after, headers_for(decision)
            )


def _header_text(text: str) -> str:
    """Text safe inside a quoted header parameter: printable ASCII without quotes or
    backslashes (RFC 9110 quoted-string), whatever it was built from."""
    return "".join(c for c in text if " " <= c <= "~" and c not in '"\\')[:200]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    kind, _, token = header.partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def authorize(request: Request, scope: str) -> Principal:
    """The caller's principal, who must hold `scope` and be within the rate limit; kept on
    the request for the access log and set on the request span."""
    access: AccessControl = request.app.state.components.access
    principal = await access.principal(request, scope)
    request.state.principal = principal
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("enduser.id", principal.subject)
    if scope not in principal.scopes:
        await access.refused(principal.client)
        challenge = f'{REALM}, error="insufficient_scope", scope="{scope}"'
        raise HTTPException(
            403, f"the token lacks the {scope!r} scope", {"WWW-Authenticate": challenge}
        )
    await access.check_rate(principal)
    return principal


def scoped(dependency: Callable[[Request], Awaitable[T]], scope: str) -> Any:
    """`Depends(dependency)`, marked with the scope it enforces (app.api.openapi documents
    it on every operation that depends on it)."""
    dependency.required_scope = scope  # type: ignore[attr-defined]
    return Depends(dependency)


def require(scope: str) -> Any:
    """A dependency: the caller's principal, who must hold `scope`."""

    async def principal(request: Request) -> Principal:
        return await authorize(request, scope)

    return scoped(principal, scope)
