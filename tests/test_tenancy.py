"""Tenancy and object-level authorization, on PostgreSQL (through PgBouncer) and SQLite.

Two tenants, `acme` (alice, and anna in the same tenant) and `globex` (bob), each with every
scope, and an operator (root) who also holds the admin scope. The matrix takes every operation
from the service's own OpenAPI document, so a route added later is covered without an edit
here: bob acting on acme's objects gets 404 (the object's existence is not revealed) and
acme's rows are exactly as they were; what bob lists, searches, exports or creates contains
nothing of acme's."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from app.config import Settings
from app.db.tables import generations, idempotency_keys, items
from tests.support.app import changed
from tests.support.http_servers import running_app

SECRET = "a-development-secret-of-at-least-32-chars"
TENANT_CLAIM = "org"
EVERY_SCOPE = "items:read items:write generate"
MARKER = "acme-secret-7f3a"  # in acme's item names: must never reach globex
# Path parameters that name a tenant's object, and which of acme's objects each stands for.
OBJECTS = {"item_id": "item", "generation_id": "running"}
# Path parameters that name nothing a tenant owns (the models are the deployment's).
GLOBAL = {"model_id"}


def token(sub: str, tenant: str, scope: str = EVERY_SCOPE) -> dict[str, str]:
    # Minted when the module is collected: valid for a day, however long the suite runs
    # before these tests (ten minutes was not enough once the failover tests came first).
    claims = {"sub": sub, TENANT_CLAIM: tenant, "scope": scope, "exp": int(time.time()) + 86400}
    return {"Authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}


ALICE = token("alice", "acme")
ANNA = token("anna", "acme")
BOB = token("bob", "globex")
ROOT = token("root", "ops", EVERY_SCOPE + " items:admin")


@pytest.fixture
def tenancy_settings(settings: Settings) -> Settings:
    return changed(
        settings,
        auth_mode="hs256",
        auth_hs256_secret=SECRET,
        auth_tenant_claim=TENANT_CLAIM,
        # Long enough that acme's generation is still running when bob tries it; the
        # documented examples ask for few tokens, and finish at once.
        mock_tokens=3000,
        mock_token_delay=0.01,
        stream_checkpoint_seconds=0.2,
    )


@dataclass
class Acme:
    """acme's objects, made by alice before bob tries anything."""

    item: str
    deleted: str
    done: str  # a completed item generation
    running: str  # an item generation still streaming
    chat: str  # a chat completion's generation


async def _rows(settings: Settings) -> dict[str, dict[str, Any]]:
    """Every row of every tenant, by table and id, as the database holds it."""
    engine = create_async_engine(settings.db.migrations_url)
    try:
        async with engine.connect() as conn:
            found: dict[str, dict[str, Any]] = {}
            for table, key in (
                (items, items.c.id),
                (generations, generations.c.id),
                (idempotency_keys, idempotency_keys.c.key),
            ):
                for row in (await conn.execute(select(table))).mappings():
                    found[f"{table.name}:{row[key.name]}"] = dict(row)
            return found
    finally:
        await engine.dispose()


def _settled(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """acme's rows, less what a running generation changes by itself (its text so far, its
    heartbeat)."""
    kept = {}
    for key, row in rows.items():
        if row.get("tenant") != "acme":
            continue
        moving = ("output", "completion_tokens", "time_to_first_token_seconds", "heartbeat_at")
        if key.startswith("generations:") and row["status"] == "streaming":
            kept[key] = {k: v for k, v in row.items() if k not in moving}
        else:
            kept[key] = row
    return kept


async def _generation_id(client: httpx.AsyncClient, path: str, headers: dict[str, str]) -> str:
    """Start an item generation and leave after its first event: it goes on without us."""
    async with client.stream("POST", path, headers=headers, json={}) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                return str(json.loads(line[6:])["generation_id"])
    raise AssertionError("no generation event")


async def _finished(client: httpx.AsyncClient, generation_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        body: dict[str, Any] = (
            await client.get(f"/v1/generations/{generation_id}", headers=ALICE)
        ).json()
        if body["status"] != "streaming" or time.monotonic() > deadline:
            return body
        await asyncio.sleep(0.05)


async def _acme(client: httpx.AsyncClient) -> Acme:
    async def create(name: str) -> str:
        response = await client.post(
            "/v1/items", json={"name": f"{MARKER} {name}", "price": 3}, headers=ALICE
        )
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    item, deleted = await create("lamp"), await create("old lamp")
    assert (await client.delete(f"/v1/items/{deleted}", headers=ALICE)).status_code == 204
    short = await client.post(f"/v1/items/{item}/generate", json={"max_tokens": 3}, headers=ALICE)
    done = re.search(r'"generation_id":"([^"]+)"', short.text)
    assert done is not None, short.text
    running = await _generation_id(client, f"/v1/items/{item}/generate", ALICE)
    chat = await client.post(
        "/v1/chat/completions",
        json={
            "model": "itemstream-mock",
            "max_tokens": 2,
            "messages": [{"role": "user", "content": MARKER}],
        },
        headers=ALICE,
    )
    assert chat.status_code == 200, chat.text
    chat_id = chat.json()["id"].removeprefix("chatcmpl-")
    chat_uuid = f"{chat_id[:8]}-{chat_id[8:12]}-{chat_id[12:16]}-{chat_id[16:20]}-{chat_id[20:]}"
    return Acme(item, deleted, done.group(1), running, chat_uuid)


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
    ]


def _example_body(operation: dict[str, Any]) -> Any:
    content = operation.get("requestBody", {}).get("content", {})
    media = content.get("application/json")
    return None if media is None else media.get("example", {})


@pytest.fixture
async def acme_and_client(
    tenancy_settings: Settings,
) -> AsyncIterator[tuple[Acme, httpx.AsyncClient]]:
    async with (
        running_app(tenancy_settings) as base,
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        acme = await _acme(client)
        try:
            yield acme, client
        finally:  # a generation left running would hold the server's shutdown
            await client.post(f"/v1/generations/{acme.running}/cancel", headers=ALICE)


async def test_another_tenant_reaches_nothing_of_acme(
    tenancy_settings: Settings, acme_and_client: tuple[Acme, httpx.AsyncClient]
) -> None:
    acme, client = acme_and_client
    document = (await client.get("/openapi.json")).json()
    before = _settled(await _rows(tenancy_settings))
    acme_ids = {acme.item, acme.deleted, acme.done, acme.running, acme.chat}
    tried = []
    for method, path, operation in _operations(document):
        names = re.findall(r"\{([^}]+)\}", path)
        unknown = set(names) - set(OBJECTS) - GLOBAL
        assert not unknown, f"{method} {path}: which tenant object is {unknown}? add to OBJECTS"
        owned = [name for name in names if name in OBJECTS]
        url = path
        for name in names:
            value = getattr(acme, OBJECTS[name]) if name in OBJECTS else "itemstream-mock"
            url = url.replace("{" + name + "}", value)
        body = _example_body(operation)
        params = {"q": MARKER} if method == "GET" and path == "/v1/items" else None
        response = await client.request(method, url, headers=BOB, params=params, json=body)
        tried.append(f"{method} {path} -> {response.status_code}")
        if owned:
            assert response.status_code == 404, (method, path, response.text)
            assert "acme" not in response.text
        else:
            assert response.status_code < 500, (method, path, response.text)
            assert MARKER not in response.text, (method, path, "acme's data")
            assert not any(i in response.text for i in acme_ids), (method, path, response.text)
        # The same for the deleted item (whose id bob could have guessed just as well), and
        # the permanent delete.
        if "item_id" in owned:
            params = {"include_deleted": "true"} if method == "GET" else None
            for target in (acme.deleted, acme.item):
                if method == "DELETE":
                    params = {"permanent": "true"}
                again = await client.request(
                    method, url.replace(acme.item, target), headers=BOB, json=body, params=params
                )
                assert again.status_code == 404, (method, path, again.text)
        assert _settled(await _rows(tenancy_settings)) == before, (method, path, "acme changed")
    # What bob sees: his own items and none of acme's.
    listing = (
        await client.get("/v1/items", headers=BOB, params={"include_deleted": "true"})
    ).json()
    assert listing["data"] and all(i["tenant"] == "globex" for i in listing["data"])
    export = await client.get("/v1/items/export", headers=BOB, params={"include_deleted": "true"})
    assert export.status_code == 200 and MARKER not in export.text and export.text
    print("\n".join(tried))

    # acme's own, on the other hand: anna (same tenant) reads and cancels; alice replays.
    assert (await client.get(f"/v1/items/{acme.item}", headers=ANNA)).status_code == 200
    cancelled = await client.post(f"/v1/generations/{acme.running}/cancel", headers=ANNA)
    assert cancelled.json()["status"] == "cancelled"
    ours = (await client.get("/v1/items", headers=ANNA, params={"q": MARKER})).json()["data"]
    assert [i["id"] for i in ours] == [acme.item]


async def test_the_admin_scope_reaches_every_tenant_and_is_logged(
    acme_and_client: tuple[Acme, httpx.AsyncClient], caplog: pytest.LogCaptureFixture
) -> None:
    acme, client = acme_and_client
    await client.post("/v1/items", json={"name": "globex thing", "price": 1}, headers=BOB)
    with caplog.at_level(logging.INFO, logger="itemstream.access"):
        caplog.clear()  # only the operator's requests below
        read = await client.get(f"/v1/items/{acme.item}", headers=ROOT)
        assert read.status_code == 200 and read.json()["tenant"] == "acme"
        tenants = {
            i["tenant"] for i in (await client.get("/v1/items", headers=ROOT)).json()["data"]
        }
        assert tenants == {"acme", "globex"}
        record = await client.get(f"/v1/generations/{acme.done}", headers=ROOT)
        assert record.status_code == 200 and record.json()["tenant"] == "acme"
        patched = await client.patch(f"/v1/items/{acme.item}", json={"price": 4}, headers=ROOT)
        assert patched.status_code == 200 and patched.json()["tenant"] == "acme"
    lines = [r.__dict__["http"] for r in caplog.records if hasattr(r, "http")]
    assert lines and all(line.get("admin") is True for line in lines), lines
    assert all(line["tenant"] == "ops" and line["principal"] == "root" for line in lines)
    # An operator's own items go to the operator's tenant.
    own = await client.post("/v1/items", json={"name": "ops", "price": 1}, headers=ROOT)
    assert own.json()["tenant"] == "ops"
    # Without the admin scope, the same operator is a tenant like any other.
    plain = token("root", "ops")
    assert (await client.get(f"/v1/items/{acme.item}", headers=plain)).status_code == 404


async def test_idempotency_keys_are_per_tenant(
    tenancy_settings: Settings, acme_and_client: tuple[Acme, httpx.AsyncClient]
) -> None:
    _, client = acme_and_client
    body = {"name": "same body", "price": 5}

    async def create(headers: dict[str, str], key: str, payload: Any = body) -> httpx.Response:
        return await client.post(
            "/v1/items", json=payload, headers={**headers, "Idempotency-Key": key}
        )

    first = await create(ALICE, "k-1")
    theirs = await create(BOB, "k-1")  # the same key and body from another tenant: a new item
    assert first.status_code == theirs.status_code == 201
    assert "idempotent-replayed" not in theirs.headers
    assert first.json()["id"] != theirs.json()["id"]
    assert theirs.json()["tenant"] == "globex"
    # A key taken first by globex does not block acme, even with another body.
    assert (await create(BOB, "k-2")).status_code == 201
    assert (await create(ALICE, "k-2", {"name": "other", "price": 6})).status_code == 201
    # Within a tenant, a key is one key: anna's retry replays alice's create.
    replay = await create(ANNA, "k-1")
    assert replay.status_code == 201 and replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["id"] == first.json()["id"]
    assert (await create(ANNA, "k-1", {"name": "changed", "price": 5})).status_code == 422
    keys = [k for k in await _rows(tenancy_settings) if k.startswith("idempotency_keys:")]
    assert len(keys) == 4, keys


async def test_a_token_without_a_usable_tenant_is_refused(
    acme_and_client: tuple[Acme, httpx.AsyncClient],
) -> None:
    _, client = acme_and_client
    for claims in ({}, {TENANT_CLAIM: ""}, {TENANT_CLAIM: ["a"]}, {TENANT_CLAIM: "x\u0000"}):
        payload = {"sub": "eve", "exp": int(time.time()) + 60, "scope": EVERY_SCOPE, **claims}
        bearer = {"Authorization": f"Bearer {jwt.encode(payload, SECRET, algorithm='HS256')}"}
        response = await client.get("/v1/items", headers=bearer)
        assert response.status_code == 401, (claims, response.text)
        assert "tenant" in response.json()["detail"]
    numeric = {"sub": "n", "exp": int(time.time()) + 60, "scope": EVERY_SCOPE, TENANT_CLAIM: 42}
    bearer = {"Authorization": f"Bearer {jwt.encode(numeric, SECRET, algorithm='HS256')}"}
    created = await client.post("/v1/items", json={"name": "n", "price": 1}, headers=bearer)
    assert created.json()["tenant"] == "42"
