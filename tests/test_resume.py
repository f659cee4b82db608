"""Resumable item generations: the generation outlives its client, any instance of the service
(another app with its own pools and memory: another worker or pod) resumes it from the last
event id using what is in PostgreSQL, and the model is called once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.db.migrations import migrate
from harness.pgbouncer import PgBouncer
from harness.postgres import PostgresServer
from tests.support.app import make_settings, through, truncate
from tests.support.http_servers import FakeUpstream, fake_upstream, running_app
from tests.support.sse import each_event

CHECKPOINT = 0.2


async def events(response: httpx.Response) -> list[tuple[str, str | None, dict[str, Any]]]:
    return [found async for found in each_event(response)]


async def first_tokens(client: httpx.AsyncClient, item_id: str, count: int) -> tuple[str, str, str]:
    """Start a generation, read `count` token events, drop the connection: its id, the text
    received and the last event id."""
    text, last_id, generation_id, tokens = "", "", "", 0
    async with client.stream(
        "POST", f"/v1/items/{item_id}/generate", json={"max_tokens": 40}
    ) as response:
        assert response.status_code == 200
        async for event, event_id, data in each_event(response):
            if event == "generation":
                generation_id = data["generation_id"]
            elif event == "token":
                text += data["text"]
                last_id = event_id or ""
                tokens += 1
                if tokens == count:
                    break
    return generation_id, text, last_id


async def record(client: httpx.AsyncClient, generation_id: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while True:
        body: dict[str, Any] = (await client.get(f"/v1/generations/{generation_id}")).json()
        if body["status"] == status or time.monotonic() > deadline:
            return body
        await asyncio.sleep(0.05)


def upstream_settings(settings: Settings, upstream_url: str, **overrides: Any) -> Settings:
    return make_settings(
        settings.db.url,
        db_pooler=settings.db.pooler,
        migration_database_url=settings.db.migration_url,
        llm_provider="openai",
        llm_base_url=upstream_url,
        llm_models=FakeUpstream.MODELS,
        llm_model="endless",  # a token every 50 ms: 40 tokens take about 2 s
        stream_checkpoint_seconds=CHECKPOINT,
        **overrides,
    )


@pytest.fixture
async def pg_settings(pg: PostgresServer, pgbouncer_modern: PgBouncer, schema_db: str) -> Settings:
    await truncate(pg, schema_db)
    return through(pgbouncer_modern, pg, schema_db)


async def _resume_elsewhere(settings: Settings, upstream: FakeUpstream, upstream_url: str) -> None:
    producer_settings = upstream_settings(settings, upstream_url)
    async with (
        running_app(producer_settings) as pod_a,
        running_app(upstream_settings(settings, upstream_url)) as pod_b,
        httpx.AsyncClient(base_url=pod_a, timeout=30) as a,
        httpx.AsyncClient(base_url=pod_b, timeout=30) as b,
    ):
        item = (await a.post("/v1/items", json={"name": "cup", "price": 3})).json()
        generation_id, received, last_id = await first_tokens(a, item["id"], 5)
        assert int(last_id) == len(received), "a token event's id counts characters"

        # While it runs, on the other instance, from the last id received.
        async with b.stream(
            "GET", f"/v1/generations/{generation_id}/events", headers={"Last-Event-ID": last_id}
        ) as response:
            assert response.status_code == 200
            assert (await b.get(f"/v1/generations/{generation_id}")).json()["status"] == (
                "streaming"
            ), "resumed while the generation was still running"
            resumed = await events(response)
        names = [name for name, _, _ in resumed]
        assert names[0] == "generation" and names[-1] == "done", names
        assert set(names[1:-1]) == {"token"}
        rest = "".join(data["text"] for name, _, data in resumed if name == "token")
        ids = [int(i) for name, i, _ in resumed if name == "token" and i is not None]
        assert ids == sorted(ids) and ids[-1] == len(received + rest)
        done = resumed[-1][2]
        assert done["status"] == "completed"

        final = await record(b, generation_id, "completed")
        assert received + rest == final["output"], "nothing lost, nothing twice"
        assert final["completion_tokens"] == 40
        stored = (await b.get(f"/v1/items/{item['id']}")).json()
        assert stored["generated_text"] == final["output"]
        assert done["item_version"] == stored["version"] == 2

        # After it ended, again from the middle, as a browser's first EventSource connection
        # (no headers: the query parameter).
        async with b.stream(
            "GET", f"/v1/generations/{generation_id}/events", params={"last_event_id": "3"}
        ) as response:
            again = await events(response)
        assert again[0][2]["replayed"] is True
        assert "".join(d["text"] for n, _, d in again if n == "token") == final["output"][3:]
        assert len(upstream.calls) == 1, "resuming never calls the model again"


@pytest.mark.postgres
async def test_a_generation_outlives_its_client_and_resumes_on_another_instance(
    pg_settings: Settings,
) -> None:
    async with fake_upstream() as (upstream, upstream_url):
        await _resume_elsewhere(pg_settings, upstream, upstream_url)


async def test_resume_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'resume.db'}"
    await migrate(make_settings(url).db.app_url)
    async with fake_upstream() as (upstream, upstream_url):
        await _resume_elsewhere(make_settings(url), upstream, upstream_url)


@pytest.mark.postgres
async def test_cancel_stops_a_running_generation_from_another_instance(
    pg_settings: Settings,
) -> None:
    async with (
        fake_upstream() as (upstream, upstream_url),
        running_app(upstream_settings(pg_settings, upstream_url)) as pod_a,
        running_app(upstream_settings(pg_settings, upstream_url)) as pod_b,
        httpx.AsyncClient(base_url=pod_a, timeout=30) as a,
        httpx.AsyncClient(base_url=pod_b, timeout=30) as b,
    ):
        item = (await a.post("/v1/items", json={"name": "cup", "price": 3})).json()
        generation_id, _, _ = await first_tokens(a, item["id"], 2)
        cancelled = await b.post(f"/v1/generations/{generation_id}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        asked = time.monotonic()
        await asyncio.wait_for(upstream.closed.wait(), 5)
        closed_at = upstream.calls[0].closed_at
        assert closed_at is not None and closed_at - asked < CHECKPOINT + 1.0
        final = (await a.get(f"/v1/generations/{generation_id}")).json()
        assert final["status"] == "cancelled" and final["error"] == "cancelled by a client"
        assert final["completion_tokens"] < 40
        assert (await a.get(f"/v1/items/{item['id']}")).json()["generated_text"] is None
        # Resuming a cancelled generation after all it saved: nothing to stream, so a status.
        saved = str(len(final["output"] or ""))
        resumed = await b.get(
            f"/v1/generations/{generation_id}/events", headers={"Last-Event-ID": saved}
        )
        assert resumed.status_code == 409, resumed.text
        assert "cancelled" in resumed.json()["detail"]
        # Cancelling what has ended changes nothing.
        again = await b.post(f"/v1/generations/{generation_id}/cancel")
        assert again.json()["finished_at"] == final["finished_at"]


async def test_resume_answers_clear_errors(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'errors.db'}"
    await migrate(make_settings(url).db.app_url)
    async with running_app(make_settings(url)) as base, httpx.AsyncClient(base_url=base) as client:
        missing = await client.get("/v1/generations/01a22d07-0c1e-7d2a-9b3f-5c6d7e8f9a0b/events")
        assert missing.status_code == 404
        bad = await client.get(
            "/v1/generations/01a22d07-0c1e-7d2a-9b3f-5c6d7e8f9a0b/events",
            headers={"Last-Event-ID": "abc"},
        )
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "Last-Event-ID"
        gone = await client.post("/v1/generations/01a22d07-0c1e-7d2a-9b3f-5c6d7e8f9a0b/cancel")
        assert gone.status_code == 404
