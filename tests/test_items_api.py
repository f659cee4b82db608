"""HTTP-level tests of /v1/items, run on PostgreSQL (through PgBouncer 1.24) and on SQLite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from app import __version__ as app_version
from app.config import Settings
from app.main import create_app
from tests.support.app import app_client, changed

PROBLEM = "application/problem+json"


async def create(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    body = {"name": "Widget", "price": 10, **fields}
    response = await client.post("/v1/items", json=body)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def assert_problem(response: httpx.Response, status: int, *, contains: str = "") -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["title"]
    assert "Traceback" not in response.text
    if contains:
        assert contains in body.get("detail", ""), body
    return body


# --- create -------------------------------------------------------------------------------


async def test_create_returns_201_location_etag(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/items", json={"name": " Lamp ", "description": "desk", "price": "19.99"}
    )
    assert response.status_code == 201
    body = response.json()
    assert response.headers["location"] == f"/v1/items/{body['id']}"
    assert response.headers["etag"] == '"1"'
    assert body["name"] == "Lamp"
    assert body["price"] == 19.99
    assert body["is_active"] is True
    assert body["version"] == 1
    assert body["deleted_at"] is None
    assert body["created_at"].endswith("Z") or body["created_at"].endswith("+00:00")
    fetched = await client.get(response.headers["location"])
    assert fetched.json() == body


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_location_keeps_the_root_path_the_app_is_mounted_under(settings: Settings) -> None:
    app = create_app(settings)  # as behind a proxy that mounts it under /api
    transport = httpx.ASGITransport(app=app, root_path="/api")
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test/api") as client,
    ):
        created = await client.post("/v1/items", json={"name": "n", "price": "1"})
        location = created.headers["location"]
        assert location == f"/api/v1/items/{created.json()['id']}"
        assert (await client.get(location.removeprefix("/api"))).status_code == 200


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"price": 1}, "name"),
        ({"name": "x"}, "price"),
        ({"name": "   ", "price": 1}, "name"),
        ({"name": "x" * 201, "price": 1}, "name"),
        ({"name": "x", "price": -1}, "price"),
        ({"name": "x", "price": "1.234"}, "price"),
        ({"name": "x", "price": 10**11}, "price"),
        ({"name": "x", "price": "abc"}, "price"),
        ({"name": "x", "price": 1, "is_active": "maybe"}, "is_active"),
        ({"name": "x", "price": 1, "owner": "me"}, "owner"),
    ],
)
async def test_create_validation_names_the_field(
    client: httpx.AsyncClient, payload: dict[str, Any], field: str
) -> None:
    body = assert_problem(await client.post("/v1/items", json=payload), 422)
    assert field in body["detail"]
    assert any(error["field"] == field for error in body["errors"])
    assert (await client.get("/v1/items?include_total=true")).json()["total"] == 0


async def test_malformed_json_is_422_and_stores_nothing(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/items",
        content=b'{"name": "x", "price": ',
        headers={"content-type": "application/json"},
    )
    assert_problem(response, 422, contains="not valid JSON")
    assert (await client.get("/v1/items?include_total=true")).json()["total"] == 0


async def test_body_over_limit_is_413(client: httpx.AsyncClient) -> None:
    big = {"name": "x", "price": 1, "description": "a" * 2_000_000}
    assert_problem(await client.post("/v1/items", json=big), 413, contains="exceeds")

    async def chunks() -> AsyncIterator[
        bytes
    ]:  # no Content-Length: the limit applies while streaming
        yield b'{"name": "x", "price": 1, "description": "'
        for _ in range(40):
            yield b"a" * 50_000
        yield b'"}'

    response = await client.post(
        "/v1/items", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_problem(response, 413)
    assert (await client.get("/v1/items?include_total=true")).json()["total"] == 0


async def test_idempotent_retry_returns_first_response(client: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = await client.post("/v1/items", json={"name": "A", "price": 1}, headers=headers)
    again = await client.post("/v1/items", json={"name": "A", "price": 1}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert (await client.get("/v1/items?include_total=true")).json()["total"] == 1


async def test_idempotency_key_with_other_body_is_refused(client: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "k1"}
    assert (
        await client.post("/v1/items", json={"name": "A", "price": 1}, headers=headers)
    ).status_code == 201
    other = await client.post("/v1/items", json={"name": "B", "price": 1}, headers=headers)
    assert_problem(other, 422, contains="different request body")
    assert (await client.get("/v1/items?include_total=true")).json()["total"] == 1


@pytest.mark.parametrize("key", ["", "x" * 256, "has space", "tab\there"])
async def test_bad_idempotency_key_is_422(client: httpx.AsyncClient, key: str) -> None:
    response = await client.post(
        "/v1/items", json={"name": "A", "price": 1}, headers={"Idempotency-Key": key}
    )
    assert_problem(response, 422)


async def test_failed_create_does_not_burn_the_key(client: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "retry-me"}
    bad = await client.post("/v1/items", json={"name": "A", "price": -5}, headers=headers)
    assert_problem(bad, 422)
    good = await client.post("/v1/items", json={"name": "A", "price": 5}, headers=headers)
    assert good.status_code == 201


# --- read ---------------------------------------------------------------------------------


async def test_get_unknown_is_404_and_bad_id_is_422(client: httpx.AsyncClient) -> None:
    assert_problem(
        await client.get("/v1/items/01a20133-11c7-796d-ae90-80cd2e437b36"),
        404,
        contains="not found",
    )
    body = assert_problem(await client.get("/v1/items/not-a-uuid"), 422)
    assert body["errors"][0]["field"] == "item_id"


async def test_if_none_match_gives_304(client: httpx.AsyncClient) -> None:
    item = await create(client)
    response = await client.get(f"/v1/items/{item['id']}", headers={"If-None-Match": '"1"'})
    assert response.status_code == 304
    response = await client.get(f"/v1/items/{item['id']}", headers={"If-None-Match": '"7"'})
    assert response.status_code == 200


# --- list ---------------------------------------------------------------------------------


async def test_empty_list(client: httpx.AsyncClient) -> None:
    body = (await client.get("/v1/items")).json()
    assert body == {"data": [], "per_page": 20, "page": 1, "total": None, "next_cursor": None}
    counted = (await client.get("/v1/items?include_total=true")).json()
    assert counted["total"] == 0


async def test_offset_pages_and_last_page(client: httpx.AsyncClient) -> None:
    for index in range(25):
        await create(client, name=f"item {index:02}")
    pages = [
        (await client.get(f"/v1/items?per_page=10&page={n}&sort=name&include_total=true")).json()
        for n in (1, 2, 3, 4)
    ]
    assert [len(page["data"]) for page in pages] == [10, 10, 5, 0]
    assert all(page["total"] == 25 for page in pages)
    names = [item["name"] for page in pages for item in page["data"]]
    assert names == [f"item {index:02}" for index in range(25)]
    assert pages[2]["next_cursor"] is None
    assert pages[0]["next_cursor"] is not None


@pytest.mark.parametrize(
    "query", ["per_page=0", "per_page=101", "page=0", "sort=color", "min_price=-1"]
)
async def test_bad_list_parameters(client: httpx.AsyncClient, query: str) -> None:
    assert_problem(await client.get(f"/v1/items?{query}"), 422)


async def test_cursor_walk_is_stable_under_inserts(client: httpx.AsyncClient) -> None:
    originals = {(await create(client, name=f"n{index:02}"))["id"] for index in range(23)}
    for sort in ("-created_at", "name", "-price"):
        seen: list[str] = []
        url = f"/v1/items?per_page=5&sort={sort}"
        page = (await client.get(url)).json()
        while True:
            seen += [item["id"] for item in page["data"]]
            # Concurrent writers: new rows sort before and after the cursor position.
            await create(client, name="a-new", price=0)
            await create(client, name="z-new", price=999)
            if page["next_cursor"] is None:
                break
            page = (await client.get(f"{url}&cursor={page['next_cursor']}")).json()
            assert page["total"] is None and page["page"] is None
        assert len(seen) == len(set(seen)), f"duplicates with sort={sort}"
        assert originals <= set(seen), f"skipped rows with sort={sort}"


async def test_link_header_points_to_next_page(client: httpx.AsyncClient) -> None:
    for index in range(3):
        await create(client, name=f"i{index}")
    response = await client.get("/v1/items?per_page=2&is_active=true")
    link = response.headers["link"]
    assert 'rel="next"' in link and "cursor=" in link and "is_active=true" in link
    follow = await client.get(link.split(">")[0].lstrip("<"))
    assert len(follow.json()["data"]) == 1


async def test_cursor_errors(client: httpx.AsyncClient) -> None:
    for index in range(3):
        await create(client, name=f"i{index}")
    cursor = (await client.get("/v1/items?per_page=1&sort=name")).json()["next_cursor"]
    assert_problem(
        await client.get(f"/v1/items?sort=price&cursor={cursor}"), 400, contains="different sort"
    )
    assert_problem(await client.get(f"/v1/items?sort=name&is_active=false&cursor={cursor}"), 400)
    assert_problem(await client.get("/v1/items?cursor=%%%garbage"), 400, contains="cursor")
    # A cursor says where the page starts: with one, a page number is ignored.
    both = await client.get(f"/v1/items?sort=name&page=2&cursor={cursor}&per_page=1")
    assert both.status_code == 200 and both.json()["page"] is None
    assert both.json()["data"][0]["name"] == "i1"


async def test_filters_and_sorting(client: httpx.AsyncClient) -> None:
    await create(client, name="cheap", price="1.50")
    await create(client, name="mid", price=20)
    await create(client, name="dear", price=300, is_active=False)

    async def names(query: str) -> list[str]:
        return [item["name"] for item in (await client.get(f"/v1/items?{query}")).json()["data"]]

    assert await names("sort=price") == ["cheap", "mid", "dear"]
    assert await names("sort=-price") == ["dear", "mid", "cheap"]
    assert await names("sort=name") == ["cheap", "dear", "mid"]
    assert await names("is_active=false") == ["dear"]
    assert await names("min_price=1.5&max_price=20&sort=price") == ["cheap", "mid"]
    assert await names("min_price=21") == ["dear"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("widg", {"Widget"}),
        ("WIDGET", {"Widget"}),
        ("100%", {"100% cotton"}),
        ("a_b", {"a_b token"}),
        ("O'Brien", {"O'Brien's chair"}),
        ('say "hi"', {"sign"}),
        ("äpfel", {"ÄPFEL box"}),
        ("ß", {"Straße sign"}),
        ("C:\\temp", {"path"}),
        ("%", {"100% cotton"}),
        ("_", {"a_b token"}),
        ("nothing-matches", set()),
    ],
)
async def test_search_is_literal_and_case_insensitive(
    client: httpx.AsyncClient, query: str, expected: set[str]
) -> None:
    await create(client, name="Widget")
    await create(client, name="100% cotton")
    await create(client, name="100 cotton")
    await create(client, name="a_b token")
    await create(client, name="axb token")
    await create(client, name="O'Brien's chair")
    await create(client, name="sign", description='people say "hi"')
    await create(client, name="ÄPFEL box")
    await create(client, name="Straße sign")
    await create(client, name="path", description="C:\\temp\\x")
    response = await client.get("/v1/items", params={"q": query})
    assert response.status_code == 200
    assert {item["name"] for item in response.json()["data"]} == expected


# --- update -------------------------------------------------------------------------------


async def test_put_replaces_and_patch_merges(client: httpx.AsyncClient) -> None:
    item = await create(client, name="Chair", description="oak", price=50, is_active=False)
    url = f"/v1/items/{item['id']}"

    patched = await client.patch(url, json={"price": 55})
    assert patched.status_code == 200
    assert patched.json()["description"] == "oak"
    assert patched.json()["is_active"] is False
    assert patched.json()["price"] == 55
    assert patched.headers["etag"] == '"2"'

    replaced = await client.put(url, json={"name": "Stool", "price": 30})
    assert replaced.status_code == 200
    body = replaced.json()
    assert (body["name"], body["description"], body["is_active"], body["version"]) == (
        "Stool",
        None,
        True,
        3,
    )

    cleared = await client.patch(
        url,
        content=b'{"description": "pine"}',
        headers={"content-type": "application/merge-patch+json"},
    )
    assert cleared.json()["description"] == "pine"
    cleared = await client.patch(url, json={"description": None})
    assert cleared.json()["description"] is None

    unchanged = await client.patch(url, json={})
    assert unchanged.status_code == 200
    assert unchanged.json()["version"] == cleared.json()["version"]


@pytest.mark.parametrize(
    "payload",
    [
        {"name": None},
        {"price": None},
        {"is_active": None},
        {"id": "x"},
        {"version": 9},
        {"price": -1},
    ],
)
async def test_patch_validation(client: httpx.AsyncClient, payload: dict[str, Any]) -> None:
    item = await create(client)
    assert_problem(await client.patch(f"/v1/items/{item['id']}", json=payload), 422)
    assert (await client.get(f"/v1/items/{item['id']}")).json()["version"] == 1


async def test_put_requires_complete_body(client: httpx.AsyncClient) -> None:
    item = await create(client)
    assert_problem(
        await client.put(f"/v1/items/{item['id']}", json={"name": "x"}), 422, contains="price"
    )


async def test_if_match(client: httpx.AsyncClient) -> None:
    item = await create(client)
    url = f"/v1/items/{item['id']}"
    stale = await client.patch(url, json={"price": 2}, headers={"If-Match": '"9"'})
    assert_problem(stale, 412)
    assert stale.headers["etag"] == '"1"'
    assert (
        await client.patch(url, json={"price": 2}, headers={"If-Match": '"1"'})
    ).status_code == 200
    assert (
        await client.put(url, json={"name": "n", "price": 3}, headers={"If-Match": '"1"'})
    ).status_code == 412
    assert (
        await client.put(url, json={"name": "n", "price": 3}, headers={"If-Match": '"5", "2"'})
    ).status_code == 200
    assert (
        await client.patch(url, json={"price": 4}, headers={"If-Match": "*"})
    ).status_code == 200
    assert (
        await client.patch(url, json={"price": 5}, headers={"If-Match": 'W/"4"'})
    ).status_code == 412
    assert_problem(await client.patch(url, json={"price": 5}, headers={"If-Match": "4"}), 400)
    assert (await client.delete(url, headers={"If-Match": '"1"'})).status_code == 412
    assert (await client.get(url)).json()["price"] == 4


async def test_write_to_unknown_item_is_404(client: httpx.AsyncClient) -> None:
    url = "/v1/items/01a20133-11c7-796d-ae90-80cd2e437b36"
    assert_problem(await client.put(url, json={"name": "n", "price": 1}), 404)
    assert_problem(await client.patch(url, json={"price": 1}), 404)
    assert_problem(await client.patch(url, json={"price": 1}, headers={"If-Match": '"1"'}), 404)
    assert_problem(await client.delete(url), 404)
    assert_problem(await client.delete(f"{url}?permanent=true"), 404)
    assert_problem(await client.post(f"{url}/restore"), 404)


# --- delete / restore ---------------------------------------------------------------------


async def test_soft_delete_and_restore(client: httpx.AsyncClient) -> None:
    item = await create(client)
    url = f"/v1/items/{item['id']}"
    deleted = await client.delete(url)
    assert deleted.status_code == 204 and deleted.content == b""
    assert_problem(await client.get(url), 404)
    assert_problem(await client.patch(url, json={"price": 1}), 404)
    assert_problem(await client.delete(url), 404)
    assert (await client.get("/v1/items?include_total=true")).json()["total"] == 0
    hidden = (await client.get(f"{url}?include_deleted=true")).json()
    assert hidden["deleted_at"] is not None
    listed = (await client.get("/v1/items?include_deleted=true")).json()
    assert [row["id"] for row in listed["data"]] == [item["id"]]

    restored = await client.post(f"{url}/restore", headers={"If-Match": f'"{hidden["version"]}"'})
    assert restored.status_code == 200
    assert restored.json()["deleted_at"] is None
    again = await client.post(f"{url}/restore")
    assert again.status_code == 200 and again.json()["version"] == restored.json()["version"]
    assert (await client.get("/v1/items?include_total=true")).json()["total"] == 1


async def test_hard_delete(client: httpx.AsyncClient) -> None:
    live, soft = await create(client), await create(client)
    assert (await client.delete(f"/v1/items/{soft['id']}")).status_code == 204
    for item in (live, soft):
        url = f"/v1/items/{item['id']}"
        response = await client.delete(f"{url}?permanent=true")
        assert response.status_code == 204
        assert_problem(await client.get(f"{url}?include_deleted=true"), 404)
        assert_problem(await client.post(f"{url}/restore"), 404)


async def test_require_if_match_setting(settings: Settings) -> None:
    strict = changed(settings, require_if_match=True)
    async with app_client(strict) as client:
        item = await create(client)
        assert_problem(await client.patch(f"/v1/items/{item['id']}", json={"price": 1}), 428)
        assert_problem(await client.delete(f"/v1/items/{item['id']}"), 428)
        ok = await client.patch(
            f"/v1/items/{item['id']}", json={"price": 1}, headers={"If-Match": '"1"'}
        )
        assert ok.status_code == 200


# --- errors, health, docs -----------------------------------------------------------------


async def test_unknown_route_and_method(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/v2/nothing"), 404)
    assert_problem(await client.request("TRACE", "/v1/items"), 405)


async def test_unexpected_error_is_500_without_trace(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.services.items import ItemService

    async def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret internals at /srv/app.py line 3")

    monkeypatch.setattr(ItemService, "get", boom)
    response = await client.get("/v1/items/01a20133-11c7-796d-ae90-80cd2e437b36")
    body = assert_problem(response, 500)
    assert "secret" not in response.text and body["detail"] == "internal error"


async def test_health(client: httpx.AsyncClient) -> None:
    live = (await client.get("/livez")).json()
    assert live["status"] == "ok" and live["version"] == app_version and live["revision"]
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ok"


async def test_openapi_documents_the_semantics(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    delete = spec["paths"]["/v1/items/{item_id}"]["delete"]
    assert "restore" in delete["description"] and "permanent" in delete["description"]
    assert "Merge Patch" in spec["paths"]["/v1/items/{item_id}"]["patch"]["description"]
    assert (await client.get("/docs")).status_code == 200


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_cors_only_for_allowed_origins(settings: Settings) -> None:
    allowed = changed(settings, cors_allow_origins=["https://app.example"])
    async with app_client(allowed) as client:
        ok = await client.get("/v1/items", headers={"Origin": "https://app.example"})
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        assert "etag" in ok.headers["access-control-expose-headers"].lower()
        other = await client.get("/v1/items", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        preflight = await client.options(
            "/v1/items/x",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "PATCH",
                "Access-Control-Request-Headers": "if-match",
            },
        )
        assert preflight.status_code == 200
