"""The OpenAPI document says what the service does: errors in the shapes they come in, event
streams with their events, parameters that are absent rather than null, bearer tokens with
their scopes. (A schema-driven fuzzer found what these pin; see docs/api.md.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from app.db.migrations import migrate
from tests.support.app import app_client, make_settings

HS = "a-development-secret-of-at-least-32-chars"


async def _document(tmp_path: Path, **overrides: Any) -> tuple[dict[str, Any], httpx.Response]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'doc.db'}"
    await migrate(make_settings(url).db.app_url)
    async with app_client(make_settings(url, **overrides)) as client:
        document = (await client.get("/openapi.json")).json()
        root = await client.get("/", follow_redirects=False)
    return document, root


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, operation)
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
    ]


async def test_errors_are_documented_in_the_shape_they_come_in(tmp_path: Path) -> None:
    document, root = await _document(tmp_path)
    assert root.status_code in (302, 307) and root.headers["location"] == "/docs"
    assert "HTTPValidationError" not in str(document)
    for method, path, operation in _operations(document):
        openai = path.startswith(("/v1/chat", "/v1/models"))
        for code, response in operation["responses"].items():
            if int(code) < 400 or path in ("/readyz",):
                continue
            (media,) = response["content"]
            assert media == ("application/json" if openai else "application/problem+json"), (
                method,
                path,
                code,
            )
        if path.startswith("/v1/"):
            assert {"401", "403", "429", "500", "503"} <= set(operation["responses"]), path
        if "requestBody" in operation:
            assert {"400", "413", "415", "422"} <= set(operation["responses"]), path


async def test_event_streams_declare_their_events(tmp_path: Path) -> None:
    document, _ = await _document(tmp_path)
    generate = document["paths"]["/v1/items/{item_id}/generate"]["post"]["responses"]["200"]
    events = generate["content"]["text/event-stream"]["itemSchema"]["oneOf"]
    names = {e["properties"]["event"]["const"] for e in events}
    assert names == {"generation", "token", "done", "error"}
    token = next(e for e in events if e["properties"]["event"]["const"] == "token")
    assert "id" in token["required"]
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert chat["application/json"]["schema"]["$ref"].endswith("/ChatCompletion")
    assert "itemSchema" in chat["text/event-stream"]


async def test_parameters_and_bodies_declare_what_validation_accepts(tmp_path: Path) -> None:
    document, _ = await _document(tmp_path)
    for _, path, operation in _operations(document):
        for parameter in operation.get("parameters", []):
            assert "null" not in str(parameter["schema"]), (path, parameter["name"])
    schemas = document["components"]["schemas"]
    assert schemas["ItemIn"]["properties"]["price"]["type"] == "number"
    assert schemas["ItemIn"]["properties"]["name"]["pattern"] == "^[^\\x00]*$"
    patch = schemas["ItemPatch"]["properties"]
    assert "null" not in str(patch["name"]) and "null" in str(patch["description"])
    assert schemas["ItemIn"].get("additionalProperties") is False


async def test_bearer_tokens_and_scopes_per_operation(tmp_path: Path) -> None:
    document, _ = await _document(tmp_path, auth_mode="hs256", auth_hs256_secret=HS)
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    scopes = {
        (method, path): operation.get("x-required-scope")
        for method, path, operation in _operations(document)
        if path.startswith("/v1/")
    }
    assert scopes[("get", "/v1/items")] == "items:read"
    assert scopes[("post", "/v1/items")] == "items:write"
    assert scopes[("post", "/v1/chat/completions")] == "generate"
    for method, path, operation in _operations(document):
        if path.startswith("/v1/") and not path.startswith("/v1/models"):
            assert {"bearer": []} in operation["security"], (method, path)
    (tmp_path / "none").mkdir()
    none, _ = await _document(tmp_path / "none")
    assert "securitySchemes" not in none["components"]


async def test_method_not_allowed_lists_every_method_of_the_resource(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'allow.db'}"
    await migrate(make_settings(url).db.app_url)
    async with app_client(make_settings(url)) as client:
        items = await client.request("OPTIONS", "/v1/items")
        assert items.status_code == 405 and items.headers["allow"] == "GET, HEAD, POST"


def _pointer(*parts: str) -> str:
    return "".join("/" + part.replace("~", "~0").replace("/", "~1") for part in parts)


async def test_every_operation_shows_valid_request_and_response_examples(tmp_path: Path) -> None:
    document, _ = await _document(tmp_path)
    registry = Registry().with_resource(
        "urn:openapi", Resource.from_contents(document, DRAFT202012)
    )

    def problems(pointer: str, instance: Any) -> list[str]:
        validator = Draft202012Validator(
            {"$ref": "urn:openapi#" + pointer}, registry=registry, format_checker=FormatChecker()
        )
        return [error.message for error in validator.iter_errors(instance)]

    checked = 0
    for method, path, operation in _operations(document):
        bodies = [(("requestBody",), operation.get("requestBody", {}))] + [
            (("responses", code), response)
            for code, response in operation["responses"].items()
            if code < "300"
        ]
        for where, body in bodies:
            for media_type, media in body.get("content", {}).items():
                assert "example" in media, (method, path, where, media_type)
                if "schema" in media:  # JSON; text formats show the text on the wire
                    at = _pointer("paths", path, method, *where, "content", media_type, "schema")
                    assert not problems(at, media["example"]), (method, path, where)
                    checked += 1
    for name, schema in document["components"]["schemas"].items():
        for example in schema.get("examples", []):
            assert not problems(_pointer("components", "schemas", name), example), name
    assert checked >= 15


async def test_a_path_segment_of_a_literal_route_is_never_an_item_id(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'doc.db'}"
    await migrate(make_settings(url).db.app_url)
    async with app_client(make_settings(url)) as client:
        for method in ("PUT", "PATCH", "DELETE"):
            response = await client.request(method, "/v1/items/export", json={"name": "x"})
            assert response.status_code == 405, (method, response.text)
            assert response.headers["allow"] == "GET, HEAD"
        not_an_id = await client.get("/v1/items/not-an-id")
        assert not_an_id.status_code == 422 and not_an_id.json()["errors"][0]["field"] == "item_id"
        # An error about the whole body names no field (a field called "body" would mislead).
        whole = await client.post("/v1/items", json=[1])
        assert whole.status_code == 422
        assert whole.json()["errors"][0] | {"message": ""} == {
            "location": "body",
            "field": "",
            "message": "",
            "type": "model_attributes_type",
        }
