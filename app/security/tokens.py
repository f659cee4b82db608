"""Bearer JWT verification: RS256/ES256 against an issuer's JWKS (found through OIDC
discovery, cached, re-fetched when a token names an unknown key, so keys rotate without a
restart), or HS256 with a shared secret for development.

Refused: `alg: none`, algorithms outside the allowlist, an algorithm that does not match the
key type (the HS/RS confusion attack), and tokens without `exp`, `sub` or the tenant claim.
No refusal repeats what the token says (its values would reach a response header).

While the issuer's keys cannot be fetched, a token naming a key not in the cache is not called
invalid (the client would drop a good token): KeySourceUnavailable, which is a 503.

A token that verified is remembered by its exact text (cachetools' TLRUCache, bounded) until
it expires (with the leeway the check allows), at most `jwks_cache_seconds`, and until the
issuer's key set changes: the same answer the check would give, without the signature math
on every request. Refused tokens are never remembered."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from cachetools import TLRUCache

log = logging.getLogger(__name__)

ASYMMETRIC = {"RS256": "RSA", "ES256": "EC"}


class InvalidToken(Exception):
    """The token is missing, malformed, expired, not for us, or not signed by the issuer.
    `detail` is safe to show; `error` is the RFC 6750 error code."""

    def __init__(self, detail: str, error: str = "invalid_token") -> None:
        super().__init__(detail)
        self.detail = detail
        self.error = error


class KeySourceUnavailable(Exception):
    """The issuer's discovery document or JWKS could not be fetched."""


@dataclass(frozen=True, slots=True)
class VerifiedClaims:
    subject: str
    scopes: frozenset[str]
    tenant: str


def _until(token: str, remembered: tuple[VerifiedClaims, float], now: float) -> float:
    return remembered[1]


def scopes_of(claims: Mapping[str, Any]) -> frozenset[str]:
    """OAuth `scope` (space-separated) or `scp` (a list, as Entra ID and Okta send)."""
    scope = claims.get("scope")
    if isinstance(scope, str):
        return frozenset(scope.split())
    scp = claims.get("scp")
    if isinstance(scp, list):
        return frozenset(str(item) for item in scp)
    if isinstance(scp, str):
        return frozenset(scp.split())
    return frozenset()


class TokenVerifier:
    def __init__(
        self,
        *,
        issuer: str | None,
        audience: str | None,
        jwks_url: str | None = None,
        algorithms: tuple[str, ...] = ("RS256", "ES256"),
        hs256_secret: str | None = None,
        leeway_seconds: float = 30.0,
        jwks_cache_seconds: float = 300.0,
        jwks_min_refresh_seconds: float = 10.0,
        tenant_claim: str = "sub",
        client: httpx.AsyncClient | None = None,
        verified_tokens_cached: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._issuer = issuer
        self._audience = audience
        self._jwks_url = jwks_url
        self._algorithms = tuple(a for a in algorithms if a in ASYMMETRIC)
        self._secret = hs256_secret
        self._leeway = leeway_seconds
        self._cache_seconds = jwks_cache_seconds
        self._min_refresh = jwks_min_refresh_seconds
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(5.0))
        self._tenant_claim = tenant_claim
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = 0.0
        self._fetch_failed = False  # the last attempt to fetch the keys failed
        self._lock = asyncio.Lock()
        self._clock = clock
        self._fingerprint: set[str] = set()  # the key set's entries, to notice a change
        # token -> (claims, until when they may be reused), by the wall clock as `exp` is.
        self._verified: TLRUCache[str, tuple[VerifiedClaims, float]] | None = (
            TLRUCache(verified_tokens_cached, ttu=_until, timer=clock)
            if verified_tokens_cached
            else None
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def verify(self, token: str) -> VerifiedClaims:
        if self._verified is not None:
            remembered = self._verified.get(token)
            if remembered is not None:
                return remembered[0]
        verified, expires = await self._verify(token)
        if self._verified is not None:
            now = self._clock()
            until = min(expires + self._leeway, now + self._cache_seconds)
            if until > now:
                self._verified[token] = (verified, until)
        return verified

    async def _verify(self, token: str) -> tuple[VerifiedClaims, float]:
        """The claims of a token that verifies, and its expiry (epoch seconds)."""
        alg, key = await self._algorithm_and_key(token)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError as error:
            raise InvalidToken("the token has expired") from error
        except jwt.ImmatureSignatureError as error:
            raise InvalidToken("the token is not valid yet") from error
        except jwt.InvalidAudienceError as error:
            raise InvalidToken("the token is not for this audience") from error
        except jwt.InvalidIssuerError as error:
            raise InvalidToken("the token is from another issuer") from error
        except jwt.MissingRequiredClaimError as error:
            raise InvalidToken(f"the token has no {error.claim!r} claim") from error
        except jwt.InvalidTokenError as error:
            raise InvalidToken("the token's signature does not verify") from error
        verified = VerifiedClaims(
            _subject(claims), scopes_of(claims), _tenant(claims, self._tenant_claim)
        )
        return verified, float(claims["exp"])

    async def _algorithm_and_key(self, token: str) -> tuple[str, Any]:
        """What the token's header asks for, if this verifier accepts it."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as error:  # malformed, or a header field of a wrong type
            raise InvalidToken("the token is not a well-formed JWT") from error
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise InvalidToken("the token's header names no algorithm")
        if self._secret is not None:
            if alg != "HS256":
                raise InvalidToken("the token's algorithm is not accepted")
            return alg, self._secret
        if alg not in self._algorithms:
            raise InvalidToken("the token's algorithm is not accepted")
        jwk = await self._key(header.get("kid"))
        # The key decides the algorithm family: an HS256 token "signed" with a public RSA key,
        # or an ES256 header on an RSA key, never verifies.
        if jwk.key_type != ASYMMETRIC[alg]:
            raise InvalidToken("the token's algorithm does not match its key")
        return alg, jwk.key

    async def _key(self, kid: object) -> jwt.PyJWK:
        if not isinstance(kid, str):
            raise InvalidToken("the token names no signing key (kid)")
        stale = time.monotonic() - self._fetched_at > self._cache_seconds
        if kid not in self._keys or stale:
            await self._refresh(force=kid not in self._keys)
        found = self._keys.get(kid)
        if found is None:
            if self._fetch_failed:
                # Perhaps a key the issuer rotated in: unknowable until its keys come back.
                raise KeySourceUnavailable("the issuer's keys cannot be fetched")
            raise InvalidToken("the token is signed with an unknown key")
        return found

    async def _refresh(self, *, force: bool) -> None:
        async with self._lock:
            since = time.monotonic() - self._fetched_at
            # An unknown kid re-fetches the JWKS (key rotation), but at most every
            # min_refresh seconds: forged kids must not turn into a flood of fetches.
            if since < self._min_refresh or (not force and since < self._cache_seconds):
                return
            try:
                url = self._jwks_url or await self._discover()
                response = await self._client.get(url)
                response.raise_for_status()
                document = response.json()
                entries = document.get("keys") if isinstance(document, dict) else None
                if not isinstance(entries, list):
                    raise ValueError("the JWKS document has no list of keys")
            except (httpx.HTTPError, ValueError, KeySourceUnavailable) as error:
                self._fetched_at = time.monotonic()  # back off before the next attempt
                self._fetch_failed = True
                if self._keys:
                    log.warning("JWKS refresh failed, keeping the cached keys: %s", error)
                    return
                raise KeySourceUnavailable(f"cannot fetch the issuer's keys: {error}") from error
            keys: dict[str, jwt.PyJWK] = {}
            fingerprint = set()
            for entry in entries:
                kid = entry.get("kid") if isinstance(entry, dict) else None
                if not isinstance(kid, str) or entry.get("use", "sig") != "sig":
                    continue
                try:
                    keys[kid] = jwt.PyJWK(entry)
                except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
                    continue  # a key type this service does not use, or a broken one
                fingerprint.add(json.dumps(entry, sort_keys=True))
            if self._verified is not None and fingerprint != self._fingerprint:
                self._verified.clear()  # a key withdrawn: what it signed must verify again
            self._fingerprint = fingerprint
            self._keys = keys
            self._fetched_at = time.monotonic()
            self._fetch_failed = False
            log.info("loaded %d signing keys from the issuer", len(keys))

    async def _discover(self) -> str:
        if not self._issuer:
            raise KeySourceUnavailable("no AUTH_ISSUER or AUTH_JWKS_URL configured")
        url = self._issuer.rstrip("/") + "/.well-known/openid-configuration"
        response = await self._client.get(url)
        response.raise_for_status()
        document = response.json()
        jwks_uri = document.get("jwks_uri") if isinstance(document, dict) else None
        if not isinstance(jwks_uri, str):
            raise KeySourceUnavailable("the issuer's discovery document has no jwks_uri")
        self._jwks_url = jwks_uri
        return jwks_uri


def _subject(claims: dict[str, Any]) -> str:
    """The subject is stored (items.created_by, generations.principal): PostgreSQL text holds
    neither NUL nor more than the column's 255 characters."""
    subject = claims["sub"]
    if not isinstance(subject, str) or not subject or "\x00" in subject or len(subject) > 255:
        raise InvalidToken("the token's 'sub' claim is not a usable subject")
    return subject


def _tenant(claims: dict[str, Any], name: str) -> str:
    """The tenant is stored on every row and compared in every query: a non-empty string (a
    number is taken as its decimal text) of at most 255 printable characters."""
    value = claims.get(name)
    if value is None:
        raise InvalidToken(f"the token has no {name!r} claim (its tenant)")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value or len(value) > 255 or not value.isprintable():
        raise InvalidToken(f"the token's {name!r} claim is not a usable tenant")
    return value
