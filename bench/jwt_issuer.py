"""The JWT row of `make bench`: an RSA key, its JWKS (served by the bench's sink), and a token
for a tenant, as an identity provider would issue it."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa


@dataclass(frozen=True)
class BenchIssuer:
    private: Any
    kid: str = "bench-rsa"
    issuer: str = "https://issuer.bench.invalid"
    audience: str = "itemstream"

    @classmethod
    def new(cls) -> BenchIssuer:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048))

    def jwks(self) -> bytes:
        public: dict[str, Any] = json.loads(
            jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key())
        )
        return json.dumps(
            {"keys": [{**public, "kid": self.kid, "alg": "RS256", "use": "sig"}]}
        ).encode()

    def token(self, subject: str, *, lifetime: float = 7200) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.audience,
            "iat": now,
            "exp": now + int(lifetime),
            "scope": "items:read items:write generate",
        }
        return jwt.encode(claims, self.private, algorithm="RS256", headers={"kid": self.kid})
