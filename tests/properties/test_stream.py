"""The SSE transport (app.api.streaming) under generated timelines, on a virtual clock: tokens
arriving at any pace, an upstream failure, a client that disconnects or stops reading at any
moment, the process shutting down, the stream's deadline. The watch's checks run at every
event, as its task would.

Invariants, for every timeline:
- the run is finished (its first finish decides the outcome, as GenerationRun's does);
- at most one response start, and nothing after the last body message;
- a client that reads nothing is given up within STREAM_SEND_TIMEOUT of a blocked write;
- a stream past its deadline ends (504 before its first byte, an error event after);
- on shutdown the stream ends within the drain period (a final error event, or 503);
- the response ends once the run has ended (no hang)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.types import Message

from app.api import streaming
from app.api.routes.generations import ItemEventFormat
from app.api.streaming import EventStreamResponse
from app.lifecycle import Lifecycle
from app.providers.base import ProviderError
from app.services.generations import Finished


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


@dataclass
class FakeRun:
    """A run whose tokens come when the timeline says."""

    deadline: float
    id: Any = field(default_factory=uuid4)
    model: str = "m"
    created: datetime = field(default_factory=lambda: datetime.now(UTC))
    replayed: bool = False
    chars: int = 0
    tokens: int = 0
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    released: int = 0  # tokens the timeline has let through
    total: int = 5
    fail_at: int | None = None
    finishes: list[str] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def __aiter__(self) -> FakeRun:
        return self

    async def __anext__(self) -> str:
        while True:
            if self.fail_at is not None and self.tokens == self.fail_at:
                raise ProviderError("unavailable", "the upstream failed")
            if self.tokens >= self.total:
                raise StopAsyncIteration
            if self.tokens < self.released:
                self.tokens += 1
                self.chars += 2
                return "t "
            self.wake.clear()
            await self.wake.wait()

    async def finish(self, outcome: str, error: str | None = None) -> Finished:
        # As GenerationRun: the first call decides the outcome, later ones get the same.
        self.finishes.append(outcome)
        outcome = self.finishes[0]
        generation: Any = type(
            "G",
            (),
            {
                "id": self.id,
                "status": outcome,
                "completion_tokens": self.tokens,
                "finish_reason": None,
            },
        )
        return Finished(generation)


@dataclass(frozen=True)
class Timeline:
    gaps: tuple[float, ...]  # seconds before each token is released
    fail_at: int | None
    disconnect_at: float | None
    stall_from: float | None  # from then on the client reads nothing
    shutdown_at: float | None
    max_seconds: float
    detach: bool


timelines = st.builds(
    Timeline,
    gaps=st.lists(st.floats(0, 20), min_size=0, max_size=5).map(tuple),
    fail_at=st.none() | st.integers(0, 4),
    disconnect_at=st.none() | st.floats(0, 60),
    stall_from=st.none() | st.floats(0, 60),
    shutdown_at=st.none() | st.floats(0, 60),
    max_seconds=st.floats(5, 120),
    detach=st.booleans(),
)

HEARTBEAT, DRAIN, SEND_TIMEOUT = 15.0, 10.0, 30.0


async def _play(timeline: Timeline, clock: Clock) -> tuple[FakeRun, list[Message], float]:
    run = FakeRun(deadline=timeline.max_seconds, total=len(timeline.gaps), fail_at=timeline.fail_at)
    lifecycle = Lifecycle()
    lifecycle.bind(asyncio.get_running_loop())
    response = EventStreamResponse(
        run,
        ItemEventFormat(),
        heartbeat_seconds=HEARTBEAT,
        drain_seconds=DRAIN,
        send_timeout=SEND_TIMEOUT,
        lifecycle=lifecycle,
        detach=timeline.detach,
    )
    sent: list[Message] = []
    unstalled = asyncio.Event()
    gone = asyncio.Event()

    async def send(message: Message) -> None:
        if timeline.stall_from is not None and clock.now >= timeline.stall_from:
            await unstalled.wait()  # the client's socket is full: the write waits
        sent.append(message)

    async def receive() -> Message:
        await gone.wait()
        return {"type": "http.disconnect"}

    events: list[tuple[float, str]] = []
    at = 0.0
    for gap in timeline.gaps:
        at += gap
        events.append((at, "token"))
    if timeline.disconnect_at is not None:
        events.append((timeline.disconnect_at, "disconnect"))
    if timeline.shutdown_at is not None:
        events.append((timeline.shutdown_at, "shutdown"))
    # The watch looks every quarter second in production; here at every event and every
    # second in between, far past the end.
    events += [(float(second), "tick") for second in range(0, 400)]
    events.sort(key=lambda event: event[0])

    task = asyncio.ensure_future(response({"type": "http"}, receive, send))
    ended_at = float("inf")
    for when, what in events:
        clock.now = when
        if what == "token":
            run.released += 1
            run.wake.set()
        elif what == "disconnect":
            gone.set()
        elif what == "shutdown":
            lifecycle.begin_shutdown()
        for _ in range(5):
            await asyncio.sleep(0)
        response.check(clock.now)
        for _ in range(5):
            await asyncio.sleep(0)
        if task.done():
            ended_at = min(ended_at, when)
            break
    unstalled.set()
    gone.set()
    await asyncio.wait_for(task, 5)
    for _ in range(20):  # the shielded cleanup that finishes the run
        await asyncio.sleep(0)
    return run, sent, ended_at


@settings(max_examples=300, deadline=None)
@given(timeline=timelines)
def test_every_timeline_ends_once_in_bounds(timeline: Timeline) -> None:
    clock = Clock()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(streaming, "time", clock)
        patch.setattr(streaming.StreamWatch, "add", lambda self, stream: None)
        run, sent, ended_at = asyncio.run(_play(timeline, clock))

    assert run.finishes, "the run was never finished"
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) <= 1
    last = [
        i
        for i, m in enumerate(sent)
        if m["type"] == "http.response.body" and not m.get("more_body", False)
    ]
    assert len(last) <= 1 and (not last or last[0] == len(sent) - 1), "something after the end"

    # Bounds: the response ends by the earliest of what must end it (one check late at most);
    # if the client reads nothing, the last event it is sent may wait SEND_TIMEOUT more.
    ends = [timeline.max_seconds + 1]
    if timeline.shutdown_at is not None:
        ends.append(timeline.shutdown_at + DRAIN + 1)
    if timeline.disconnect_at is not None and not timeline.detach:
        ends.append(timeline.disconnect_at + 1)
    bound = min(ends)
    if timeline.stall_from is not None:
        # A write blocks at the next token or heartbeat, given up SEND_TIMEOUT later; if
        # something else ends the stream first, its last event waits SEND_TIMEOUT more.
        given_up = timeline.stall_from + HEARTBEAT + SEND_TIMEOUT + 1
        if timeline.detach or bound < given_up:
            bound += SEND_TIMEOUT + 1
        else:
            bound = given_up
    assert ended_at <= bound + 1, (timeline, ended_at, ends)

    outcome = run.finishes[0]
    if (
        timeline.disconnect_at is not None
        and not timeline.detach
        and ended_at >= timeline.disconnect_at + 1
    ):
        assert outcome == "cancelled"
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    if outcome == "completed" and timeline.stall_from is None and timeline.disconnect_at is None:
        assert b"event: done" in body
    reachable = timeline.stall_from is None and timeline.disconnect_at is None
    if starts and starts[0]["status"] == 200 and outcome == "failed" and reachable:
        assert b"event: error" in body, body[-300:]  # never a silent cut
