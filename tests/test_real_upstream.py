"""The `openai` provider against an OpenAI-compatible server not written here: LLMock (PyPI
`llmock`), run as its own process. Its wire format is a real server's (role-only first chunk,
empty deltas, usage chunks, finish reasons, OpenAI error bodies), and it breaks streams on
demand: a mid-stream disconnect must end ours with an error event and a `failed` record."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import pytest

from app.db.migrations import migrate
from harness.processes import free_port, stop, wait_for_port
from tests.support.app import app_client, make_settings

LLMOCK = Path(sys.executable).parent / "llmock"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}


@contextmanager
def llmock(*options: str) -> Iterator[str]:
    if not LLMOCK.exists():
        pytest.fail("llmock is a dev dependency: uv sync")
    port = free_port()
    proc = subprocess.Popen(
        [
            *(str(LLMOCK), "serve", "--host", "127.0.0.1", "--port", str(port)),
            *("--response-style", "static", *options),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, 20, proc)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(proc)


@asynccontextmanager
async def _client(tmp_path: Path, base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    url = f"sqlite+aiosqlite:///{tmp_path / 'up.db'}"
    await migrate(make_settings(url).db.app_url)
    settings = make_settings(
        url, llm_provider="openai", llm_base_url=base_url, llm_model="gpt-4o-mini", llm_retries=0
    )
    async with app_client(settings) as client:
        yield client


def _events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


async def test_streaming_and_not_through_a_real_server(tmp_path: Path) -> None:
    with llmock() as upstream:
        async with _client(tmp_path, upstream) as client:
            done = await client.post("/v1/chat/completions", json=CHAT)
            assert done.status_code == 200, done.text
            text = done.json()["choices"][0]["message"]["content"]
            assert text and done.json()["choices"][0]["finish_reason"] == "stop"
            assert done.json()["usage"]["completion_tokens"] > 0
            record = (await client.get(done.headers["location"])).json()
            assert record["status"] == "completed" and record["output"] == text

            body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
            streamed = await client.post("/v1/chat/completions", json=body)
            events = _events(streamed.text)
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            pieces = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]]
            assert "".join(pieces) == text  # role-only and empty deltas pass through cleanly
            assert chunks[-1]["usage"]["completion_tokens"] > 0
            record = (await client.get(streamed.headers["location"])).json()
            assert record["status"] == "completed" and record["output"] == text

            item = (await client.post("/v1/items", json={"name": "lamp", "price": 1})).json()
            generated = await client.post(f"/v1/items/{item['id']}/generate", json={})
            assert "event: done" in generated.text
            after = (await client.get(f"/v1/items/{item['id']}")).json()
            assert after["generated_text"] == text


async def test_upstream_errors_pass_through_in_openais_shape(tmp_path: Path) -> None:
    with llmock("--error-rate", "429=1.0") as upstream:
        async with _client(tmp_path, upstream) as client:
            limited = await client.post("/v1/chat/completions", json=CHAT)
            assert limited.status_code == 429, limited.text
            assert limited.json()["error"]["message"]
    with llmock("--error-rate", "503=1.0") as upstream:
        async with _client(tmp_path / "b", upstream) as client:
            down = await client.post("/v1/chat/completions", json=CHAT)
            assert down.status_code == 502 and "error" in down.json()


async def test_a_mid_stream_disconnect_ends_the_stream_with_an_error(tmp_path: Path) -> None:
    """LLMock cuts the stream at a random point: before the first token the client still gets
    a real status (502); after it, a final error event. Both are recorded `failed`."""
    with llmock("--stream-fault", "disconnect=1.0") as upstream:
        async with _client(tmp_path, upstream) as client:
            mid_stream = 0
            for _ in range(10):
                broken = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
                if not broken.headers["content-type"].startswith("text/event-stream"):
                    assert broken.status_code == 502 and "error" in broken.json(), broken.text
                    continue
                events = _events(broken.text)
                errors = [json.loads(e) for e in events if e != "[DONE]" and '"error"' in e]
                assert errors, broken.text
                record = (await client.get(broken.headers["location"])).json()
                assert record["status"] == "failed" and record["error"]
                mid_stream += 1
            assert mid_stream, "LLMock never cut a stream after its first token in 10 tries"
