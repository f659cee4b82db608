"""Streams whose worker died (SIGKILL, a node gone) are failed within seconds, found by their
heartbeat (migration 0005): a running stream's row is saved at least every
HEARTBEAT_SECONDS, tokens or not, and the sweeper fails one silent for
ABANDONED_AFTER_SECONDS. A client following it elsewhere gets the text saved so far and then
the end. A row of a release without heartbeats (NULL) is swept by its start time, as before;
a worker whose own saves just failed (the database was down, so every heartbeat is late)
sweeps nothing. On PostgreSQL through PgBouncer, and on SQLite."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import bindparam, update

from app.config import Settings
from app.db.generations import GenerationRepository
from app.db.tables import generations
from app.domain.errors import DatabaseUnavailable
from app.main import create_app
from app.services import generations as generation_module
from tests.support.app import changed
from tests.support.http_servers import uvicorn_server
from tests.support.sse import each_event


def _set_times(dialect: str) -> Any:
    stamp = generations.c.created_at.type
    return (
        update(generations)
        .where(generations.c.id == bindparam("t_id"))
        .values(
            created_at=bindparam("t_created", type_=stamp),
            heartbeat_at=bindparam("t_heartbeat", type_=stamp),
        )
    )


async def _row(app: Any, *, started: timedelta, heartbeat: timedelta | None) -> uuid.UUID:
    """A streaming row with some text saved, started and last heard of that long ago."""
    now = datetime.now(UTC)
    generation_id = uuid.uuid4()
    database = app.state.components.generations._db
    async with database.transaction() as session:
        repo = GenerationRepository(session)
        await repo.insert(
            {
                "id": generation_id,
                "kind": "chat",
                "item_id": None,
                "idempotency_key": None,
                "provider": "mock",
                "model": "itemstream-mock",
                "status": "streaming",
                "created_at": now - started,
                "principal": None,
                "tenant": "default",
            }
        )
        await repo.checkpoint([(generation_id, "saved so far", 3)], now)
        await session.execute(
            "test_set_times",
            _set_times,
            {
                "t_id": generation_id,
                "t_created": now - started,
                "t_heartbeat": None if heartbeat is None else now - heartbeat,
            },
        )
    return generation_id


async def _status(client: httpx.AsyncClient, generation_id: uuid.UUID) -> dict[str, Any]:
    answer = await client.get(f"/v1/generations/{generation_id}")
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()
    return found


@pytest.fixture(autouse=True)
def _no_background_sweeper(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests sweep by hand, and count what each sweep does."""
    import app.main

    monkeypatch.setattr(app.main, "ABANDONED_SWEEP_SECONDS", 3600.0)


async def test_silent_streams_are_failed_and_live_ones_left(settings: Settings) -> None:
    app = create_app(settings)
    async with uvicorn_server(app) as base, httpx.AsyncClient(base_url=base) as client:
        after = timedelta(seconds=generation_module.ABANDONED_AFTER_SECONDS)
        oldest = timedelta(seconds=settings.streams.max_seconds + 61)
        silent = await _row(app, started=after * 3, heartbeat=after * 2)
        alive = await _row(app, started=after * 3, heartbeat=timedelta(seconds=1))
        old_release = await _row(app, started=oldest, heartbeat=None)
        young_old_release = await _row(app, started=after * 3, heartbeat=None)

        # A client follows the silent one from the text it has: it gets the rest, then the
        # end, once the sweeper has failed it.
        async with client.stream(
            "GET", f"/v1/generations/{silent}/events", headers={"Last-Event-ID": "5"}
        ) as response:
            assert response.status_code == 200
            service = app.state.components.generations
            swept = asyncio.get_running_loop().create_future()

            async def sweep() -> None:
                await asyncio.sleep(0.5)
                swept.set_result(await service.sweep_abandoned())

            task = asyncio.create_task(sweep())
            events = [found async for found in each_event(response)]
            await task
        assert swept.result() == 2
        text = "".join(data["text"] for name, _, data in events if name == "token")
        assert text == "saved so far"[5:]
        assert events[-1][0] == "error", events[-1]
        assert "abandoned" in str(events[-1][2])
        assert "or could not reach the database" in str(events[-1][2]), events[-1]

        assert (await _status(client, silent))["status"] == "failed"
        assert (await _status(client, old_release))["status"] == "failed"
        assert (await _status(client, alive))["status"] == "streaming"
        assert (await _status(client, young_old_release))["status"] == "streaming"


async def test_no_sweep_right_after_this_workers_saves_failed(settings: Settings) -> None:
    """After a database outage every worker's heartbeats are late: their streams live."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        after = timedelta(seconds=generation_module.ABANDONED_AFTER_SECONDS)
        await _row(app, started=after * 3, heartbeat=after * 2)
        service = app.state.components.generations
        database = service._db
        database.unavailable_at = time.monotonic()  # as a failed checkpoint leaves it
        assert await service.sweep_abandoned() == 0
        database.unavailable_at = time.monotonic() - after.total_seconds() - 1
        assert await service.sweep_abandoned() == 1


async def test_a_worker_without_streams_learns_of_an_outage_from_its_own_sweep(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that runs no stream saves nothing, so only its failed sweep tells it the
    database was away; the CI's full run caught it failing another worker's live streams
    right after a 20 s failover."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        after = timedelta(seconds=generation_module.ABANDONED_AFTER_SECONDS)
        await _row(app, started=after * 3, heartbeat=after * 2)
        service = app.state.components.generations

        async def unavailable(*_: Any) -> int:
            raise ConnectionResetError("connection reset by peer")  # as the driver raises it

        with monkeypatch.context() as patched:
            patched.setattr(GenerationRepository, "abandon_stale", unavailable)
            with pytest.raises(DatabaseUnavailable):
                await service.sweep_abandoned()
        assert await service.sweep_abandoned() == 0, "the outage just ended: not yet"
        database = service._db
        database.unavailable_at = time.monotonic() - after.total_seconds() - 1
        assert await service.sweep_abandoned() == 1


async def test_a_stream_waiting_for_tokens_keeps_its_heartbeat(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No tokens for longer than ABANDONED_AFTER_SECONDS (a slow upstream): the worker
    saves the row anyway, and the sweeper leaves it alone."""
    monkeypatch.setattr(generation_module, "HEARTBEAT_SECONDS", 0.2)
    monkeypatch.setattr(generation_module, "ABANDONED_AFTER_SECONDS", 1.0)
    # The first token at once (the stream's first event comes with it), the next in 4 s.
    slow = changed(settings, mock_token_delay=4.0, stream_checkpoint_seconds=0.1)
    app = create_app(slow)
    # A real connection, which the client can leave early.
    async with uvicorn_server(app) as base, httpx.AsyncClient(base_url=base) as client:
        item = (await client.post("/v1/items", json={"name": "lamp", "price": 1})).json()
        generation_id = ""
        async with client.stream(
            "POST", f"/v1/items/{item['id']}/generate", json={"max_tokens": 2}
        ) as response:
            async for event, _, data in each_event(response):
                if event == "generation":
                    generation_id = data["generation_id"]
                    break  # the client leaves; the generation goes on without it
        service = app.state.components.generations
        for _ in range(10):  # 2.5 s: past ABANDONED_AFTER_SECONDS, before the next token
            await asyncio.sleep(0.25)
            assert await service.sweep_abandoned() == 0
        assert (await _status(client, uuid.UUID(generation_id)))["status"] == "streaming"
