"""Hostile and unusual input, on both backends: one answer everywhere (a 4xx naming what is
wrong), never a 500, nothing stored."""

from __future__ import annotations

import base64
import json
import time
import tracemalloc
from typing import Any

import httpx
import jwt
import pytest

from app.security.ratelimit import MAX_TRACKED_CALLERS, Bucket, RateLimiter
from app.security.tokens import InvalidToken, TokenVerifier

NUL = "a\u0000b"


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("POST", "/v1/items", {"name": NUL, "price": 1}, "name"),
        ("POST", "/v1/items", {"name": "x", "price": 1, "description": NUL}, "description"),
        ("PATCH", "/v1/items/{id}", {"description": NUL}, "description"),
        ("PUT", "/v1/items/{id}", {"name": NUL, "price": 2}, "name"),
        ("POST", "/v1/items/{id}/generate", {"instructions": NUL}, "instructions"),
    ],
)
async def test_nul_in_a_body_is_a_422_naming_the_field(
    client: httpx.AsyncClient, method: str, path: str, body: dict[str, Any], field: str
) -> None:
    item = (await client.post("/v1/items", json={"name": "target", "price": 1})).json()
    response = await client.request(method, path.format(id=item["id"]), json=body)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == field
    assert "NUL" in response.json()["detail"]
    after = (await client.get(f"/v1/items/{item['id']}")).json()
    assert after["version"] == 1, "nothing was written"


async def test_nul_in_query_and_cursor(client: httpx.AsyncClient) -> None:
    search = await client.get("/v1/items", params={"q": NUL})
    assert search.status_code == 422 and search.json()["errors"][0]["field"] == "q"
    forged = base64.urlsafe_b64encode(
        json.dumps({"v": NUL, "id": "00000000-0000-0000-0000-000000000000", "f": "x"}).encode()
    ).decode()
    listing = await client.get("/v1/items", params={"cursor": forged, "sort": "name"})
    assert listing.status_code == 400, listing.text  # unsigned: refused before it is read
    assert listing.json()["errors"][0]["field"] == "cursor"


async def test_nul_in_chat_comes_back_in_openais_shape(client: httpx.AsyncClient) -> None:
    for body in (
        {"model": NUL, "messages": [{"role": "user", "content": "hi"}]},
        {"model": "itemstream-mock", "messages": [{"role": "user", "content": NUL}]},
        {
            "model": "itemstream-mock",
            "messages": [{"role": "user", "content": [{"type": "text", "text": NUL}]}],
        },
    ):
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert "NUL" in error["message"] and error["param"]


async def test_malformed_json_names_the_body_and_the_position(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/items",
        content=b'{"name": "a", "price": 1',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 422
    error = response.json()["errors"][0]
    assert error["location"] == "body" and error["field"] == "" and error["position"] == 24
    assert "at character 24" in response.json()["detail"]


@pytest.mark.parametrize("media", ["text/plain", "application/x-www-form-urlencoded"])
async def test_a_body_that_is_not_json_is_415(client: httpx.AsyncClient, media: str) -> None:
    body = b'{"name": "a", "price": 1}'
    response = await client.post("/v1/items", content=body, headers={"content-type": media})
    assert response.status_code == 415, response.text
    assert "application/json" in response.json()["detail"]
    chat = await client.post("/v1/chat/completions", content=body, headers={"content-type": media})
    assert chat.status_code == 415 and "error" in chat.json()
    assert (await client.get("/v1/items")).json()["data"] == []


async def test_head_wherever_get(client: httpx.AsyncClient) -> None:
    item = (await client.post("/v1/items", json={"name": "h", "price": 1})).json()
    paths = ["/v1/items", f"/v1/items/{item['id']}", "/livez", "/readyz", "/openapi.json"]
    for path in paths:
        get, head = await client.get(path), await client.head(path)
        assert head.status_code == get.status_code, path
        assert head.content == b"", path
        assert head.headers.get("etag") == get.headers.get("etag"), path
    schema = (await client.get("/openapi.json")).json()
    assert not [p for p, ops in schema["paths"].items() if "head" in ops], "HEAD is implicit"


async def test_if_none_match_star_is_304_for_an_existing_item(client: httpx.AsyncClient) -> None:
    item = (await client.post("/v1/items", json={"name": "c", "price": 1})).json()
    cached = await client.get(f"/v1/items/{item['id']}", headers={"If-None-Match": "*"})
    assert cached.status_code == 304 and cached.headers["etag"] == '"1"'
    other = await client.get(f"/v1/items/{item['id']}", headers={"If-None-Match": '"7"'})
    assert other.status_code == 200


async def test_empty_q_is_no_filter(client: httpx.AsyncClient) -> None:
    await client.post("/v1/items", json={"name": "anything", "price": 1})
    listing = await client.get("/v1/items", params={"q": ""})
    assert listing.status_code == 200 and len(listing.json()["data"]) == 1


async def test_a_token_subject_the_database_cannot_store_is_refused() -> None:
    secret = "s" * 32
    verifier = TokenVerifier(issuer=None, audience=None, hs256_secret=secret)

    def token(sub: object) -> str:
        claims = {"sub": sub, "exp": int(time.time()) + 60}
        return jwt.encode(claims, secret, algorithm="HS256")

    for bad in (NUL, "x" * 256, ""):
        with pytest.raises(InvalidToken, match="usable subject"):
            await verifier.verify(token(bad))
    assert (await verifier.verify(token("alice"))).subject == "alice"
    await verifier.aclose()


async def test_a_flood_of_distinct_callers_keeps_the_fallback_limiter_flat() -> None:
    bound = 5_000
    limiter = RateLimiter(
        None,
        requests=Bucket("requests", 10, 60),
        tokens=Bucket("tokens", 100, 3600),
        max_streams=2,
        stream_ttl_seconds=60,
        max_tracked_callers=bound,
    )

    async def flood(start: int, count: int) -> None:
        for n in range(start, start + count):
            await limiter.hit(f"10.0.{n}")
            await limiter.acquire_stream(f"10.0.{n}")

    tracemalloc.start()  # before the first entry, so that evicted ones count as freed
    await flood(0, 4 * bound)  # past the bound, and the dicts' tables at their steady size
    before = tracemalloc.take_snapshot()
    await flood(4 * bound, 8 * bound)  # twice as many new callers again
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert len(limiter._memory) <= bound and len(limiter._slots) <= bound
    assert grown < 200_000, f"{grown} bytes more after {8 * bound} more callers"
    # A released slot leaves nothing behind.
    assert await limiter.acquire_stream("one")
    await limiter.release_stream("one")
    assert "itemstream:rl:streams:one" not in limiter._slots
    assert bound <= MAX_TRACKED_CALLERS  # the production bound
