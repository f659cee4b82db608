"""Token streams against real servers: the app under uvicorn on loopback, PostgreSQL through
PgBouncer, the official `openai` client, and a fake OpenAI-compatible upstream over HTTP."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.config import Settings
from app.db.migrations import migrate
from harness.pgbouncer import PgBouncer
from harness.postgres import PostgresServer
from tests.support.app import make_settings, through, truncate
from tests.support.http_servers import FakeUpstream, fake_upstream, running_app

pytestmark = pytest.mark.postgres


@pytest.fixture
async def pg_settings(pg: PostgresServer, pgbouncer_modern: PgBouncer, schema_db: str) -> Settings:
    await truncate(pg, schema_db)
    return through(pgbouncer_modern, pg, schema_db)


def with_(settings: Settings, **overrides: Any) -> Settings:
    return make_settings(settings.db.url, **{**_carry(settings), **overrides})


def _carry(settings: Settings) -> dict[str, Any]:
    return {
        "db_pooler": settings.db.pooler,
        "migration_database_url": settings.db.migration_url,
    }


async def sse(response: httpx.Response) -> AsyncIterator[tuple[str | None, str]]:
    """(event, data) pairs; comments come back as ("comment", text)."""
    event: str | None = None
    data: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith(":"):
            yield "comment", line[1:].strip()
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            yield event, "\n".join(data)
            event, data = None, []


async def generation(base: str, generation_id: str, wait_for_end: bool = True) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base) as client:
        deadline = time.monotonic() + 10
        while True:
            body: dict[str, Any] = (await client.get(f"/v1/generations/{generation_id}")).json()
            if not wait_for_end or body["status"] != "streaming" or time.monotonic() > deadline:
                return body
            await asyncio.sleep(0.05)


def chat_body(model: str, *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "tell me about streams"}],
        "stream": stream,
        **extra,
    }


# --- the official openai client against the OpenAI-compatible endpoint ----------------------


async def test_openai_client_streaming_and_not(pg_settings: Settings) -> None:
    settings = with_(pg_settings, mock_tokens=12, mock_token_delay=0.0)
    async with running_app(settings) as base:
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        messages: Any = [{"role": "user", "content": "describe a widget"}]
        completion = await client.chat.completions.create(
            model="itemstream-mock", messages=messages
        )
        text = completion.choices[0].message.content
        assert text and len(text.split()) == 12
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage is not None and completion.usage.completion_tokens == 12

        stream = await client.chat.completions.create(
            model="itemstream-mock",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
        parts: list[str] = []
        finish = usage = chunk_id = None
        async for chunk in stream:
            chunk_id = chunk.id
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
        # Deterministic provider: the same prompt streams the same text.
        assert "".join(parts) == text
        assert finish == "stop"
        assert usage is not None and usage.completion_tokens == 12
        assert chunk_id and chunk_id.startswith("chatcmpl-")

        record = await generation(base, str(_uuid(chunk_id.removeprefix("chatcmpl-"))))
        assert record["status"] == "completed"
        assert record["output"] == text
        assert record["completion_tokens"] == 12
        assert record["time_to_first_token_seconds"] is not None

        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model="itemstream-mock", messages=[])
        assert bad.value.status_code == 400
        assert "messages" in bad.value.message


def _uuid(hex_: str) -> str:
    import uuid

    return str(uuid.UUID(hex_))


# --- the openai provider against a fake upstream --------------------------------------------


async def test_upstream_stream_is_relayed_with_trace_context(pg_settings: Settings) -> None:
    async with fake_upstream() as (upstream, upstream_url):
        settings = with_(
            pg_settings,
            llm_provider="openai",
            llm_base_url=upstream_url,
            llm_models=FakeUpstream.MODELS,
        )
        async with running_app(settings) as base, httpx.AsyncClient(base_url=base) as client:
            traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            async with client.stream(
                "POST",
                "/v1/chat/completions",
                json=chat_body("normal"),
                headers={"traceparent": traceparent},
            ) as response:
                assert response.status_code == 200
                assert response.headers["cache-control"] == "no-cache"
                assert response.headers["x-accel-buffering"] == "no"
                events = [data async for _, data in sse(response)]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            assert text == " tok0 tok1 tok2 tok3 tok4"
            assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        seen = upstream.calls[0].headers.get("traceparent", "")
        assert seen.split("-")[1] == "0af7651916cd43dd8448eb211c80319c"


async def test_slow_first_token_gets_heartbeats(pg_settings: Settings) -> None:
    async with fake_upstream() as (upstream, upstream_url):
        upstream.slow_seconds = 1.2
        settings = with_(
            pg_settings,
            llm_provider="openai",
            llm_base_url=upstream_url,
            llm_models=FakeUpstream.MODELS,
            stream_heartbeat_seconds=0.3,
        )
        async with running_app(settings) as base, httpx.AsyncClient(base_url=base) as client:
            kinds = []
            async with client.stream(
                "POST", "/v1/chat/completions", json=chat_body("slow-first")
            ) as response:
                assert response.status_code == 200
                async for event, _ in sse(response):
                    kinds.append("ping" if event == "comment" else "data")
            first_data = kinds.index("data")
            # Role chunk and pings before the first token; at least 2 pings in 1.2 s.
            assert kinds.count("ping") >= 2
            assert kinds[first_data + 1 :].count("data") >= 6


@pytest.mark.parametrize(
    ("model", "status", "calls"),
    [("fail-500", 502, 2), ("fail-429", 429, 1), ("flaky", 200, 2)],
)
async def test_upstream_failure_before_first_token(
    pg_settings: Settings, model: str, status: int, calls: int
) -> None:
    async with fake_upstream() as (upstream, upstream_url):
        settings = with_(
            pg_settings,
            llm_provider="openai",
            llm_base_url=upstream_url,
            llm_models=FakeUpstream.MODELS,
            llm_model=model,
        )
        async with running_app(settings) as base, httpx.AsyncClient(base_url=base) as client:
            response = await client.post("/v1/chat/completions", json=chat_body(model))
            assert response.status_code == status, response.text
            if status == 429:
                assert response.headers["retry-after"] == "7"
                assert response.json()["error"]["type"] == "rate_limit_error"
                assert "slow down" in response.json()["error"]["message"]
            elif status == 502:
                assert response.json()["error"]["code"] == "upstream_error"
            else:
                assert response.text.rstrip().endswith("data: [DONE]")
            # One retry before the first token for a 5xx, none for a 429.
            assert len(upstream.calls) == calls

            item = await client.post("/v1/items", json={"name": "x", "price": 1})
            generate = await client.post(f"/v1/items/{item.json()['id']}/generate")
            if status != 200:
                assert generate.headers["content-type"] == "application/problem+json"
                assert generate.json()["status"] == status


@pytest.mark.parametrize("model", ["break-after-2", "cut-after-2"])
async def test_upstream_failure_after_first_token_ends_with_error_event(
    pg_settings: Settings, model: str
) -> None:
    async with fake_upstream() as (upstream, upstream_url):
        settings = with_(
            pg_settings,
            llm_provider="openai",
            llm_base_url=upstream_url,
            llm_models=FakeUpstream.MODELS,
        )
        async with running_app(settings) as base, httpx.AsyncClient(base_url=base) as client:
            async with client.stream(
                "POST", "/v1/chat/completions", json=chat_body(model)
            ) as response:
                assert response.status_code == 200
                events = [data async for _, data in sse(response)]
            last = json.loads(events[-1])
            assert last["error"]["type"] == "api_error"
            assert "[DONE]" not in events
            chunk_id = json.loads(events[0])["id"]
            record = await generation(base, _uuid(chunk_id.removeprefix("chatcmpl-")))
            assert record["status"] == "failed"
            assert record["completion_tokens"] == 2
            assert record["output"] == " tok0 tok1"
        assert len(upstream.calls) == 1  # never retried after the first token


async def test_client_disconnect_cancels_upstream_and_records_cancelled(
    pg_settings: Settings,
) -> None:
    """A chat stream's client leaving ends it (OpenAI's semantics); an item generation goes on
    (tests/test_resume.py)."""
    async with fake_upstream() as (upstream, upstream_url):
        settings = with_(
            pg_settings,
            llm_provider="openai",
            llm_base_url=upstream_url,
            llm_models=FakeUpstream.MODELS,
        )
        async with running_app(settings) as base:
            client = httpx.AsyncClient(base_url=base)
            body = chat_body("endless", max_tokens=1000)
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                location = response.headers["location"]
                chunks = 0
                async for _, data in sse(response):
                    chunks += data.startswith("{")
                    if chunks == 3:
                        break
            await client.aclose()  # the connection goes away mid-stream
            left = time.monotonic()
            await asyncio.wait_for(upstream.closed.wait(), 5)
            closed_at = upstream.calls[0].closed_at
            assert closed_at is not None
            assert closed_at - left < 1.0, "the upstream kept streaming after the client left"
            record = await generation(base, location.rsplit("/", 1)[-1])
            assert record["status"] == "cancelled"
            assert record["completion_tokens"] >= 2


# --- item-grounded generation -----------------------------------------------------------------


async def _generate(client: httpx.AsyncClient, item_id: str, key: str | None) -> dict[str, Any]:
    headers = {"Idempotency-Key": key} if key else {}
    async with client.stream("POST", f"/v1/items/{item_id}/generate", headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            return {"status": response.status_code, "body": response.json()}
        events = [(event, json.loads(data)) async for event, data in sse(response)]
    done = events[-1]
    assert done[0] == "done", events
    text = "".join(data["text"] for event, data in events if event == "token")
    return {"status": 200, "done": done[1], "text": text, "start": events[0][1]}


@pytest.mark.parametrize("backend_name", ["postgres", "sqlite"])
async def test_item_generation_is_stored_exactly_once(
    pg_settings: Settings, backend_name: str, tmp_path: Any
) -> None:
    settings = with_(pg_settings, mock_tokens=20, mock_token_delay=0.01)
    if backend_name == "sqlite":
        from app.db.migrations import migrate

        url = f"sqlite+aiosqlite:///{tmp_path / 'g.db'}"
        await migrate(make_settings(url).db.app_url)
        settings = make_settings(url, mock_tokens=20, mock_token_delay=0.01)
    async with running_app(settings) as base, httpx.AsyncClient(base_url=base) as client:
        item = (await client.post("/v1/items", json={"name": "Lamp", "price": 20})).json()
        first, second = await asyncio.gather(
            _generate(client, item["id"], "gen-1"), _generate(client, item["id"], "gen-1")
        )
        # One generated; the duplicate either was refused while it ran or replayed it.
        new = [r for r in (first, second) if r["status"] == 200 and not r["done"]["replayed"]]
        assert len(new) == 1, (first, second)
        generated = new[0]
        (duplicate,) = [r for r in (first, second) if r is not generated]
        assert duplicate["status"] == 409 or (
            duplicate["done"]["replayed"] and duplicate["text"] == generated["text"]
        )
        assert len(generated["text"].split()) == 20
        assert generated["done"]["item_version"] == 2

        replay = await _generate(client, item["id"], "gen-1")
        assert replay["done"]["replayed"] is True
        assert replay["text"] == generated["text"]
        stored = (await client.get(f"/v1/items/{item['id']}")).json()
        assert stored["version"] == 2  # applied once, whatever was repeated
        assert stored["generated_text"] == generated["text"]
        assert stored["generation_id"] == generated["done"]["generation_id"]

        fresh = await _generate(client, item["id"], None)  # no key: a new generation
        assert fresh["done"]["item_version"] == 3
        missing = await client.post("/v1/items/00000000-0000-7000-8000-000000000000/generate")
        assert missing.status_code == 404


async def test_stream_limits(pg_settings: Settings) -> None:
    settings = with_(
        pg_settings,
        mock_tokens=1000,
        mock_token_delay=0.05,
        stream_max_concurrent=1,
        stream_max_seconds=0.6,
        max_prompt_chars=100,
        stream_max_tokens=50,
    )
    async with running_app(settings) as base, httpx.AsyncClient(base_url=base) as client:
        async with client.stream(
            "POST", "/v1/chat/completions", json=chat_body("itemstream-mock")
        ) as held:
            assert held.status_code == 200
            busy = await client.post("/v1/chat/completions", json=chat_body("itemstream-mock"))
            assert busy.status_code == 503
            assert busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["code"] == "overloaded"
            events = [data async for _, data in sse(held)]
        # 0.6 s at 20 tokens/s: the deadline ends it with an error, not a silent cut.
        assert "maximum duration" in json.loads(events[-1])["error"]["message"]

        long_prompt = chat_body("itemstream-mock", stream=False)
        long_prompt["messages"][0]["content"] = "x" * 101
        too_long = await client.post("/v1/chat/completions", json=long_prompt)
        assert too_long.status_code == 400
        assert too_long.json()["error"]["param"] == "messages"
        item = (await client.post("/v1/items", json={"name": "x", "price": 1})).json()
        bad = await client.post(
            f"/v1/items/{item['id']}/generate", json={"instructions": "", "extra": 1}
        )
        assert bad.status_code == 422
        assert bad.headers["content-type"] == "application/problem+json"


async def test_stream_metrics(pg_settings: Settings) -> None:
    settings = with_(pg_settings, mock_tokens=7, mock_token_delay=0.0, mock_fail_after=None)
    async with running_app(settings) as base, httpx.AsyncClient(base_url=base) as client:
        for _ in range(3):
            ok = await client.post("/v1/chat/completions", json=chat_body("itemstream-mock"))
            assert ok.status_code == 200
        text = (await client.get("/metrics")).text
    samples = _samples(text)
    assert samples['itemstream_streams_total{outcome="completed",provider="mock"}'] == 3
    assert samples['itemstream_stream_tokens_total{provider="mock"}'] == 21
    assert samples['itemstream_stream_time_to_first_token_seconds_count{provider="mock"}'] == 3
    assert samples["itemstream_streams_active"] == 0


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            if "{" in name:
                base, labels = name.split("{", 1)
                parts = sorted(p for p in labels.rstrip("}").split(",") if p)
                name = base + "{" + ",".join(parts) + "}"
            out[name] = float(value)
    return out


async def test_a_client_that_stops_reading_is_dropped(tmp_path: Path) -> None:
    """Backpressure, then a decision: the server's writes wait while the client's socket is
    full (memory stays bounded), and after STREAM_SEND_TIMEOUT the stream is given up and
    recorded `cancelled`, not left open forever."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'slow.db'}"
    await migrate(make_settings(url).db.app_url)
    settings = make_settings(
        url,
        mock_tokens=100_000,
        mock_token_delay=0.0,
        stream_send_timeout=1.5,
        stream_max_seconds=60,
        stream_max_tokens=100_000,
    )
    body = json.dumps(chat_body("itemstream-mock")).encode()
    async with running_app(settings) as base:
        host, port = base.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
            b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        location = next(
            line.split(":", 1)[1].strip()
            for line in head.split("\r\n")
            if line.lower().startswith("location:")
        )
        # From here on the client reads nothing.
        async with httpx.AsyncClient(base_url=base) as client:

            async def ended() -> dict[str, Any]:
                while True:
                    record = (await client.get(location)).json()
                    if record["status"] != "streaming":
                        return dict(record)
                    await asyncio.sleep(0.2)

            record = await asyncio.wait_for(ended(), 15)
        writer.close()
    assert record["status"] == "cancelled", record
    assert "read nothing for 1.5s" in record["error"]
    assert record["completion_tokens"] < 100_000  # it stopped producing, it did not buffer
