"""Hostile input against the service as shipped: gunicorn with two workers, PostgreSQL through
PgBouncer, JWT auth against an issuer's JWKS, rate limits on Redis, production settings.

Each probe named in the hostile-client review, then cases generated with Hypothesis (token
headers and claims, cursors, header sets, Unicode with lone surrogates, numbers at the edges
of what JSON, Decimal and the columns hold). Every answer must be: no 5xx; a 4xx in its
documented shape (problem+json, or OpenAI's error object under /v1/chat and /v1/models); no
byte the client sent copied into a response header; and no unhandled error in the log."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.db.migrations import migrate
from harness.pgbouncer import PgBouncer
from harness.postgres import PostgresServer
from harness.processes import run_coroutine
from harness.servers import Server, pooled_env, serve
from tests.support.jwks_server import AUDIENCE, ThreadedIssuer, threaded_issuer

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

CURSOR_SECRET = "hostile-test-cursor-key-0123456789"
MARKER = "zq9MARKERq9z"  # put into what a client sends; must never come back in a header
OPENAI_PATHS = ("/v1/chat/", "/v1/models")
CASES = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass
class Shipped:
    server: Server
    issuer: ThreadedIssuer
    http: httpx.Client

    def token(self, **claims: Any) -> dict[str, str]:
        claims.setdefault("sub", f"hostile-{uuid.uuid4().hex[:8]}")
        return {"Authorization": f"Bearer {self.issuer.token(**claims)}"}

    def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self.http.request(method, path, **kwargs)
        check(response, path)
        return response


def check(response: httpx.Response, path: str) -> None:
    """The invariants every answer to a hostile request keeps."""
    assert response.status_code < 500, (response.status_code, response.text[:500])
    for name, value in response.headers.items():
        assert MARKER.lower() not in (name + value).lower(), f"echoed into {name}: {value[:200]}"
    assert "server" not in response.headers, "the server header is off by default"
    if response.status_code < 400:
        return
    kind = response.headers.get("content-type", "")
    body = response.json()
    if path.startswith(OPENAI_PATHS):
        assert kind.startswith("application/json"), kind
        assert set(body["error"]) >= {"message", "type"}, body
    else:
        assert kind == "application/problem+json", (kind, response.text[:300])
        assert body["status"] == response.status_code and body["title"], body


def assert_log_clean(server: Server) -> None:
    log = server.output()
    for sign in ("unhandled error", "Exception in ASGI application", "Traceback"):
        assert sign not in log, log[log.find(sign) - 2000 : log.find(sign) + 2000]


@pytest.fixture(scope="module")
def shipped(pg: PostgresServer, pgbouncer_modern: PgBouncer) -> Iterator[Shipped]:
    database = pg.create_database("itemstream_hostile")
    run_coroutine(lambda: migrate(pg.url(database)))
    with threaded_issuer() as issuer:
        env = pooled_env(
            pg,
            pgbouncer_modern,
            database,
            ENVIRONMENT="production",
            AUTH_MODE="jwt",
            AUTH_ISSUER=issuer.base,
            AUTH_AUDIENCE=AUDIENCE,
            CURSOR_SECRETS=CURSOR_SECRET,
            RATE_LIMIT_ENABLED="true",
            REDIS_URL="redis://127.0.0.1:6379/0",
            RATE_LIMIT_REQUESTS="1000000",
            RATE_LIMIT_AUTH_FAILURES="1000000",
            MOCK_TOKEN_DELAY="0",
        )
        with serve(env) as server, httpx.Client(base_url=server.base, timeout=30) as http:
            yield Shipped(server, issuer, http)
            assert_log_clean(server)
    pg.drop_database(database)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def forged(header: object, claims: object, signature: bytes = b"x" * 32) -> str:
    """A token with this header and these claims, whatever they are, and a signature no key
    made."""
    encode = json.dumps
    return ".".join([_b64(encode(header).encode()), _b64(encode(claims).encode()), _b64(signature)])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def signed_cursor(payload: object) -> str:
    """A cursor as the service signs them, with any payload (the test knows the key): what
    survives the signature must still be validated."""
    body = _b64(json.dumps(payload).encode())
    mac = hmac.new(CURSOR_SECRET.encode(), body.encode(), hashlib.sha256).digest()[:16]
    return f"{body}.{_b64(mac)}"


# --- the named probes ----------------------------------------------------------------------


def test_token_headers_that_crashed_the_verifier(shipped: Shipped) -> None:
    issuer = shipped.issuer.issuer
    claims = {"sub": "x", "aud": AUDIENCE, "iss": issuer.base, "exp": 2_000_000_000}
    kid = issuer.keys[0].kid
    probes = {
        "kid a number": {"alg": "RS256", "kid": 123},
        "kid a list": {"alg": "RS256", "kid": [kid]},
        "alg not Latin-1": {"alg": "RS256中" + MARKER, "kid": kid},
        "alg with a quote": {"alg": f'x", error="injected{MARKER}', "kid": kid},
        "alg a number": {"alg": 256, "kid": kid},
        "alg null": {"alg": None, "kid": kid},
        "no alg": {"kid": kid},
        "alg none": {"alg": "none", "kid": kid},
        "header a list": ["RS256"],
    }
    for case, header in probes.items():
        response = shipped.send("GET", "/v1/items", headers=bearer(forged(header, claims)))
        assert response.status_code == 401, (case, response.text)
        challenge = response.headers["www-authenticate"]
        assert challenge.isascii() and "injected" not in challenge, (case, challenge)
        assert challenge.count('"') % 2 == 0, challenge
        assert MARKER not in response.text, (case, "the token's value came back")
    # A 100 KB algorithm name: the header line is over the limit before anything parses it.
    huge = forged({"alg": "A" * 100_000, "kid": kid}, claims)
    response = shipped.send("GET", "/v1/items", headers=bearer(huge))
    assert response.status_code == 431, response.text
    assert len(response.content) < 1000
    assert_log_clean(shipped.server)


def test_cursors_forged_altered_or_out_of_range(shipped: Shipped) -> None:
    headers = shipped.token()
    for n in range(3):
        shipped.send("POST", "/v1/items", json={"name": f"c{n}", "price": n}, headers=headers)
    page = shipped.send("GET", "/v1/items", params={"per_page": 1}, headers=headers).json()
    real = page["next_cursor"]
    body, _, mac = real.partition(".")
    second = shipped.send("GET", "/v1/items", params={"cursor": real}, headers=headers)
    assert second.status_code == 200, "a cursor the service issued works"
    unsigned = base64.urlsafe_b64encode(
        json.dumps({"v": "Infinity", "id": str(uuid.uuid4()), "f": "0" * 16}).encode()
    ).decode()
    flipped = body[:-1] + ("A" if body[-1] != "A" else "B") + "." + mac
    for cursor in (unsigned, flipped, body, real + "x", "." + mac, "x" * 500):
        refused = shipped.send("GET", "/v1/items", params={"cursor": cursor}, headers=headers)
        assert refused.status_code == 400, (cursor, refused.text)
        assert refused.json()["errors"][0]["field"] == "cursor"
    # Signed (as if the key had leaked): every value is still checked against the column.
    fingerprint = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))["f"]
    values = ["Infinity", "1E+999999", "1E-999999", "NaN", "9999-12-31T23:59:59-14:00"]
    for sort in ("-created_at", "price"):
        for value in [*values, 5, None, "a\ud800"]:
            for raw_id in (str(uuid.uuid4()), 123, None, "not-a-uuid"):
                cursor = signed_cursor({"v": value, "id": raw_id, "f": fingerprint})
                response = shipped.send(
                    "GET", "/v1/items", params={"cursor": cursor, "sort": sort}, headers=headers
                )
                assert response.status_code == 400, (sort, value, raw_id, response.text)
    assert_log_clean(shipped.server)


def test_lone_surrogates_in_chat_and_items(shipped: Shipped) -> None:
    headers = {**shipped.token(), "content-type": "application/json"}
    for stream in ("false", "true"):
        raw = (
            '{"model": "itemstream-mock", "stream": ' + stream + ', "messages": '
            '[{"role": "user", "content": "a\\ud800"}]}'
        )
        chat = shipped.send("POST", "/v1/chat/completions", content=raw, headers=headers)
        assert chat.status_code == 400, chat.text
        assert "Unicode" in chat.json()["error"]["message"]
        parts = raw.replace('"a\\ud800"', '[{"type": "text", "text": "\\udfff"}]')
        chat = shipped.send("POST", "/v1/chat/completions", content=parts, headers=headers)
        assert chat.status_code == 400, chat.text
    item = shipped.send(
        "POST", "/v1/items", content='{"name": "a\\ud800", "price": 1}', headers=headers
    )
    assert item.status_code == 422 and "Unicode" in item.json()["detail"], item.text
    pair = shipped.send(
        "POST", "/v1/items", content='{"name": "ok \\ud83d\\ude00", "price": 1}', headers=headers
    )
    assert pair.status_code == 201 and pair.json()["name"] == "ok \U0001f600", "a pair is text"
    assert_log_clean(shipped.server)


def test_oversized_request_lines_and_headers_are_refused(shipped: Shipped) -> None:
    headers = shipped.token()
    too_long = shipped.send("GET", "/v1/items?q=" + "a" * 10_000, headers=headers)
    assert too_long.status_code == 414, too_long.text
    many = {**headers, **{f"x-h{n}": "v" for n in range(150)}}
    assert shipped.send("GET", "/v1/items", headers=many).status_code == 431
    big = {**headers, "x-big": "b" * 9000}
    assert shipped.send("GET", "/v1/items", headers=big).status_code == 431
    total = {**headers, **{f"x-t{n}": "t" * 4000 for n in range(12)}}
    assert shipped.send("GET", "/v1/items", headers=total).status_code == 431
    # A 10 MB header line, sent raw: refused once the limit is passed, not read to its end.
    with socket.create_connection(_address(shipped)) as sock:
        sock.sendall(b"GET /v1/items HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        try:
            for _ in range(160):  # 10 MiB in 64 KiB pieces
                sock.sendall(b"a" * 65536)
                sent += 65536
        except OSError:
            pass  # the server closed the connection: the rest was never read
        answer = _read_all(sock)
    # The refusal, or (the client still writing when the server closed) a reset.
    assert not answer or answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert sent < 10 * 2**20, "the server read all of it"
    assert_log_clean(shipped.server)


def _address(shipped: Shipped) -> tuple[str, int]:
    host, port = shipped.server.base.removeprefix("http://").split(":")
    return host, int(port)


def _read_all(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except OSError:
        pass
    return b"".join(chunks)


# --- generated cases -----------------------------------------------------------------------

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.just(MARKER),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
header_fields = st.dictionaries(
    st.sampled_from(["alg", "kid", "typ", "jku", "x5u", "crit", "cty", "zip", "jwk"]),
    json_value,
    max_size=5,
)
claim_sets = st.dictionaries(
    st.sampled_from(["sub", "aud", "iss", "exp", "nbf", "iat", "scope", "scp", "jti"]),
    json_value,
    max_size=7,
)


@CASES
@given(header=header_fields, claims=claim_sets, alg=st.sampled_from(["RS256", "ES256", "HS256"]))
def test_generated_token_headers_and_claims(
    shipped: Shipped, header: dict[str, Any], claims: dict[str, Any], alg: str
) -> None:
    header.setdefault("alg", alg)
    response = shipped.send("GET", "/v1/items", headers=bearer(forged(header, claims)))
    assert response.status_code == 401, response.text
    assert MARKER not in response.text


@CASES
@given(claims=claim_sets)
def test_generated_claims_under_a_real_signature(shipped: Shipped, claims: dict[str, Any]) -> None:
    """Signed by the issuer's key, so verification reaches the claims themselves."""
    key = shipped.issuer.issuer.keys[0]
    payload = {"iss": shipped.issuer.base, "aud": AUDIENCE, **claims}
    # Signed as JWS bytes: PyJWT's own encoder refuses some of these claims before signing.
    raw = json.dumps(payload).encode()
    token = jwt.PyJWS().encode(raw, key.private, algorithm=key.alg, headers={"kid": key.kid})
    response = shipped.send("GET", "/v1/items", headers=bearer(token))
    assert response.status_code in (200, 401, 403), response.text


@CASES
@given(cursor=st.one_of(st.text(max_size=300), st.binary(max_size=200).map(_b64)))
def test_generated_cursors(shipped: Shipped, cursor: str) -> None:
    response = shipped.send(
        "GET", "/v1/items", params={"cursor": cursor}, headers=shipped.token(sub="cursors")
    )
    assert response.status_code in (200, 400, 422), response.text


header_names = st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,30}\Z")
header_values = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=200,
).map(lambda value: value.strip().encode("latin-1"))


@CASES
@given(extra=st.dictionaries(header_names, header_values, max_size=12))
def test_generated_header_sets(shipped: Shipped, extra: dict[str, bytes]) -> None:
    reserved = {"authorization", "host", "content-length", "transfer-encoding", "connection"}
    headers: dict[str, Any] = {k: v for k, v in extra.items() if k.lower() not in reserved}
    headers.update(shipped.token(sub="headers"))
    for method, path in (("GET", "/v1/items"), ("POST", "/v1/items")):
        body = {"name": "h", "price": 1} if method == "POST" else None
        shipped.send(method, path, headers=headers, json=body)


unicode_text = st.text(
    alphabet=st.characters(codec=None, exclude_categories=()), max_size=60
) | st.sampled_from(["\ud800", "a\udfff", "\ud83d\ude00", "\x00", "\u202e", "\ufeff", MARKER])


def _raw_json(value: Any) -> str:
    # json.dumps escapes a lone surrogate as \\udXXX: the bytes a hostile client would send.
    return json.dumps(value, ensure_ascii=True, allow_nan=True)


@CASES
@given(name=unicode_text, description=unicode_text, q=unicode_text)
def test_generated_unicode_in_every_text_input(
    shipped: Shipped, name: str, description: str, q: str
) -> None:
    headers = {**shipped.token(sub="unicode"), "content-type": "application/json"}
    made = shipped.send(
        "POST",
        "/v1/items",
        content=_raw_json({"name": name, "description": description, "price": 1}),
        headers=headers,
    )
    if made.status_code == 201:
        stored = shipped.send("GET", made.headers["location"], headers=headers).json()
        # What was stored is what was sent, as JSON reads it (an escaped pair is one character).
        assert stored["description"] == json.loads(_raw_json(description))
    else:
        assert made.status_code == 422, made.text
    # In a URL a lone surrogate can only come as the bytes UTF-8 would give it (invalid UTF-8).
    raw_q = quote(q[:200].encode("utf-8", "surrogatepass"))
    shipped.send("GET", f"/v1/items?q={raw_q}", headers=headers)
    chat = {
        "model": "itemstream-mock",
        "max_tokens": 2,
        "messages": [{"role": "user", "content": name}],
    }
    shipped.send("POST", "/v1/chat/completions", content=_raw_json(chat), headers=headers)
    if made.status_code == 201:
        body = _raw_json({"instructions": description or "x", "max_tokens": 2})
        shipped.send("POST", f"{made.headers['location']}/generate", content=body, headers=headers)


edge_numbers = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.sampled_from(["1e999999", "-0", "0.005", "9999999999.99", "10000000000", "1E-999999"]),
)


@CASES
@given(price=edge_numbers, bound=edge_numbers)
def test_generated_numbers_at_the_edges(shipped: Shipped, price: Any, bound: Any) -> None:
    headers = {**shipped.token(sub="numbers"), "content-type": "application/json"}
    literal = str(price) if not isinstance(price, str) else price
    literal = {"inf": "Infinity", "-inf": "-Infinity", "nan": "NaN"}.get(literal, literal)
    if re.fullmatch(r"-?(sNaN|NaN|Infinity|[0-9.eE+-]+)", literal) is None:
        return
    made = shipped.send(
        "POST", "/v1/items", content='{"name": "n", "price": ' + literal + "}", headers=headers
    )
    assert made.status_code in (201, 422), made.text
    for name in ("min_price", "max_price", "per_page", "page"):
        shipped.send("GET", "/v1/items", params={name: str(bound)}, headers=headers)
    assert_log_clean(shipped.server)
