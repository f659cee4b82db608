"""A local OIDC issuer on loopback: discovery document and JWKS with keys that can rotate,
and helpers to mint tokens with the right key, a rotated key, a wrong key, and worse."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.support.http_servers import uvicorn_server

AUDIENCE = "itemstream"


@dataclass
class SigningKey:
    kid: str
    private: Any
    alg: str

    @classmethod
    def rsa(cls) -> SigningKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(f"rsa-{uuid.uuid4().hex[:8]}", key, "RS256")

    @classmethod
    def ec(cls) -> SigningKey:
        return cls(f"ec-{uuid.uuid4().hex[:8]}", ec.generate_private_key(ec.SECP256R1()), "ES256")

    def public_jwk(self) -> dict[str, Any]:
        algorithm = (
            jwt.algorithms.RSAAlgorithm if self.alg == "RS256" else jwt.algorithms.ECAlgorithm
        )
        jwk: dict[str, Any] = json.loads(algorithm.to_jwk(self.private.public_key()))
        return {**jwk, "kid": self.kid, "use": "sig", "alg": self.alg}

    def public_pem(self) -> bytes:
        pem: bytes = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem


@dataclass
class Issuer:
    base: str = ""
    keys: list[SigningKey] = field(default_factory=list)
    jwks_fetches: int = 0
    down: bool = False  # an outage: every request gets 503

    def app(self) -> Starlette:
        async def discovery(request: Request) -> JSONResponse:
            if self.down:
                return JSONResponse({"error": "unavailable"}, status_code=503)
            return JSONResponse({"issuer": self.base, "jwks_uri": f"{self.base}/jwks"})

        async def jwks(request: Request) -> JSONResponse:
            self.jwks_fetches += 1
            if self.down:
                return JSONResponse({"error": "unavailable"}, status_code=503)
            return JSONResponse({"keys": [k.public_jwk() for k in self.keys]})

        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", discovery),
                Route("/jwks", jwks),
            ]
        )

    def token(
        self,
        key: SigningKey | None = None,
        *,
        sub: str = "alice",
        scope: str = "items:read items:write generate",
        audience: str = AUDIENCE,
        expires_in: float = 300,
        kid: str | None = None,
        **claims: Any,
    ) -> str:
        key = key or self.keys[0]
        now = int(time.time())
        payload = {
            "iss": self.base,
            "sub": sub,
            "aud": audience,
            "iat": now,
            "exp": now + int(expires_in),
            "scope": scope,
            **claims,
        }
        return jwt.encode(payload, key.private, algorithm=key.alg, headers={"kid": kid or key.kid})


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _attacker_token(issuer: Issuer, alg: str, kid: str) -> str:
    """The unsigned part of a token with full scopes for `mallory`."""
    header = {"alg": alg, "typ": "JWT", "kid": kid}
    claims = {
        "iss": issuer.base,
        "sub": "mallory",
        "aud": AUDIENCE,
        "exp": int(time.time()) + 300,
        "scope": "items:read items:write generate",
    }
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"


def unsigned_token(issuer: Issuer, kid: str) -> str:
    """`alg: none`: a header and claims with an empty signature."""
    return _attacker_token(issuer, "none", kid) + "."


def confused_token(issuer: Issuer, key: SigningKey) -> str:
    """HS256 "signed" with the issuer's public key as the HMAC secret: the classic algorithm
    confusion attack against verifiers that let the token pick the algorithm."""
    signing_input = _attacker_token(issuer, "HS256", key.kid)
    signature = hmac.new(key.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


@asynccontextmanager
async def local_issuer() -> AsyncIterator[Issuer]:
    issuer = Issuer(keys=[SigningKey.rsa()])
    async with uvicorn_server(issuer.app()) as base:
        issuer.base = base
        yield issuer
