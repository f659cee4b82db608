"""What OpenAI clients and UIs look for first: the model list, the record of a completion
(found by its Location or by the completion's own id), and usage that stays right when
max_tokens cuts the answer short."""

from __future__ import annotations

import json

import httpx

CHAT = {"model": "itemstream-mock", "messages": [{"role": "user", "content": "three words here"}]}


async def test_models_list_the_configured_model(client: httpx.AsyncClient) -> None:
    listing = await client.get("/v1/models")
    assert listing.status_code == 200
    assert listing.json() == {
        "object": "list",
        "data": [
            {"id": "itemstream-mock", "object": "model", "created": 0, "owned_by": "itemstream"}
        ],
    }
    assert (await client.get("/v1/models/itemstream-mock")).json()["id"] == "itemstream-mock"
    missing = await client.get("/v1/models/gpt-none")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


async def test_a_completion_points_at_its_record(client: httpx.AsyncClient) -> None:
    done = await client.post("/v1/chat/completions", json=CHAT)
    assert done.status_code == 200
    by_location = await client.get(done.headers["location"])
    by_id = await client.get(f"/v1/generations/{done.json()['id']}")
    assert by_location.status_code == by_id.status_code == 200
    assert by_location.json() == by_id.json()
    assert by_id.json()["output"] == done.json()["choices"][0]["message"]["content"]
    async with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as s:
        location = s.headers["location"]
        await s.aread()
    assert (await client.get(location)).json()["status"] == "completed"
    assert (await client.get("/v1/generations/chatcmpl-nothex")).status_code == 404


async def test_prompt_tokens_survive_a_max_tokens_cut(client: httpx.AsyncClient) -> None:
    done = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})
    body = done.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    record = (await client.get(done.headers["location"])).json()
    assert record["prompt_tokens"] == 3 and record["completion_tokens"] == 2
    streamed = {**CHAT, "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=streamed) as s:
        events = [line[6:] async for line in s.aiter_lines() if line.startswith("data: {")]
    assert json.loads(events[-1])["usage"]["prompt_tokens"] == 3


async def test_max_tokens_above_the_limit_is_capped_not_refused(client: httpx.AsyncClient) -> None:
    done = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10**6})
    assert done.status_code == 200, done.text
    assert done.json()["usage"]["completion_tokens"] <= 4096  # STREAM_MAX_TOKENS
    for bad in (True, "5", 0):
        refused = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": bad})
        assert refused.status_code == 400, (bad, refused.text)
