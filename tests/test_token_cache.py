"""The verified-token cache gives exactly the answers the full check gives: a token is
remembered only after it verified, by its exact text, until it expires and until the issuer's
keys change; a look-alike (another signature, another audience) is checked on its own."""

from __future__ import annotations

import asyncio
import time
from unittest import mock

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.security.tokens import InvalidToken, TokenVerifier, VerifiedClaims
from tests.support.identity import AUDIENCE, SigningKey, local_issuer

SECRET = "k" * 32


def _hs256(sub: str, *, audience: str = AUDIENCE, expires_in: float = 600) -> str:
    claims = {"sub": sub, "aud": audience, "exp": int(time.time() + expires_in), "scope": "a b"}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def _tampered(token: str) -> str:
    head, body, signature = token.split(".")
    flipped = "A" if signature[0] != "A" else "B"
    return f"{head}.{body}.{flipped}{signature[1:]}"


async def _outcome(verifier: TokenVerifier, token: str) -> VerifiedClaims | str:
    try:
        return await verifier.verify(token)
    except InvalidToken as error:
        return f"refused: {error.detail}"


TOKENS = [
    _hs256("alice"),
    _hs256("bob"),
    _tampered(_hs256("alice")),
    _hs256("alice", audience="another-api"),
    _hs256("carol", expires_in=-120),  # expired beyond the leeway
    "not.a.token",
]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=30))
def test_the_cached_verifier_answers_as_the_full_check(sequence: list[str]) -> None:
    async def run() -> None:
        cached = TokenVerifier(issuer=None, audience=AUDIENCE, hs256_secret=SECRET)
        full = TokenVerifier(
            issuer=None, audience=AUDIENCE, hs256_secret=SECRET, verified_tokens_cached=0
        )
        for token in sequence:
            assert await _outcome(cached, token) == await _outcome(full, token), token
        await cached.aclose()
        await full.aclose()

    asyncio.run(run())


async def test_a_remembered_token_skips_the_signature_check_and_a_tampered_one_does_not() -> None:
    verifier = TokenVerifier(issuer=None, audience=AUDIENCE, hs256_secret=SECRET)
    token = _hs256("alice")
    with mock.patch("app.security.tokens.jwt.decode", wraps=jwt.decode) as decode:
        for _ in range(5):
            assert (await verifier.verify(token)).subject == "alice"
        assert decode.call_count == 1
        with pytest.raises(InvalidToken, match="signature"):
            await verifier.verify(_tampered(token))
        assert decode.call_count == 2
    await verifier.aclose()


async def test_a_remembered_token_is_refused_once_it_expires() -> None:
    verifier = TokenVerifier(issuer=None, audience=AUDIENCE, hs256_secret=SECRET, leeway_seconds=0)
    token = _hs256("alice", expires_in=1.5)
    assert (await verifier.verify(token)).subject == "alice"
    expiry = jwt.decode(token, options={"verify_signature": False})["exp"]
    await asyncio.sleep(max(0.0, expiry - time.time()) + 0.2)
    with pytest.raises(InvalidToken, match="expired"):
        await verifier.verify(token)
    await verifier.aclose()


async def test_a_withdrawn_key_takes_what_it_signed_out_of_the_cache() -> None:
    async with local_issuer() as issuer:
        verifier = TokenVerifier(
            issuer=issuer.base,
            audience=AUDIENCE,
            jwks_url=f"{issuer.base}/jwks",
            jwks_min_refresh_seconds=0,
        )
        old = issuer.keys[0]
        token = issuer.token(old, sub="alice")
        assert (await verifier.verify(token)).subject == "alice"
        # The issuer rotates: the old key is withdrawn (compromised), a new one signs.
        new = SigningKey.rsa()
        issuer.keys = [new]
        assert (await verifier.verify(issuer.token(new, sub="bob"))).subject == "bob"
        with pytest.raises(InvalidToken, match="unknown key"):
            await verifier.verify(token)
        await verifier.aclose()
