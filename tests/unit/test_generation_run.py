"""GenerationRun's rules against the deterministic provider and a service that records in
memory: counting, the token limit and its trailer, one outcome per run, errors and
cancellation. The database side is tested with PostgreSQL in tests/test_streaming.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, cast
from uuid import uuid4

import pytest

from app.domain.errors import GenerationEnded
from app.domain.models import Generation
from app.providers.base import Chunk, CompletionRequest, Message, ProviderError
from app.providers.mock import MockProvider
from app.services.generations import (
    Finished,
    GenerationRun,
    GenerationService,
    Outcome,
    StreamLimits,
)


class _Checkpoints:
    def __init__(self) -> None:
        self.marked: set[GenerationRun] = set()

    def mark(self, run: GenerationRun) -> None:
        self.marked.add(run)

    def forget(self, run: GenerationRun) -> None:
        self.marked.discard(run)


class _Service:
    """What a run asks of its service, kept in memory."""

    def __init__(self, provider: MockProvider, *, record_delay: float = 0.0) -> None:
        self.provider = provider
        self.limits = StreamLimits()
        self.checkpoints = _Checkpoints()
        self.record_delay = record_delay
        self.recorded: list[tuple[Outcome, str | None, int]] = []
        self.released: list[Outcome] = []
        self.first_tokens: list[float] = []
        self.upstream_errors: list[str] = []

    async def record(
        self, run: GenerationRun, outcome: Outcome, error: str | None, duration: float
    ) -> Finished:
        await asyncio.sleep(self.record_delay)
        self.recorded.append((outcome, error, run.tokens))
        return Finished(cast(Generation, (outcome, run.text)))

    async def release(self, run: GenerationRun, outcome: Outcome) -> None:
        self.released.append(outcome)

    def observe_first_token(self, seconds: float) -> None:
        self.first_tokens.append(seconds)

    def observe_upstream_error(self, error: ProviderError) -> None:
        self.upstream_errors.append(error.kind)


def _run(service: _Service, max_tokens: int = 100) -> GenerationRun:
    request = CompletionRequest("m", (Message("user", "hello there"),), max_tokens)
    return GenerationRun(
        cast(GenerationService, service),
        uuid4(),
        request,
        kind="chat",
        item_id=None,
        idempotency_key=None,
        created_at=datetime.now(UTC),
    )


async def _drain(run: GenerationRun) -> list[str]:
    return [piece async for piece in run]


async def test_a_run_counts_what_the_provider_streams() -> None:
    service = _Service(MockProvider(tokens=5, token_delay=0))
    run = _run(service)
    pieces = await _drain(run)
    assert len(pieces) == run.tokens == 5
    assert run.text == "".join(pieces) and run.chars == len(run.text)
    assert run.finish_reason == "stop" and run.prompt_tokens == 2
    assert len(service.first_tokens) == 1 and run.time_to_first_token is not None
    assert run in service.checkpoints.marked  # saved while it runs
    await run.finish("completed")
    assert service.recorded == [("completed", None, 5)] and service.released == ["completed"]
    assert run not in service.checkpoints.marked  # the record carries the whole text


async def test_at_the_token_limit_the_trailer_is_read_then_the_run_stops() -> None:
    service = _Service(MockProvider(tokens=50, token_delay=0))
    run = _run(service, max_tokens=3)
    assert len(await _drain(run)) == 3
    # The provider (told the same limit) ends with finish_reason and usage after the text.
    assert run.finish_reason == "length" and run.prompt_tokens == 2


class _Unbounded(MockProvider):
    """An upstream that ignores max_tokens."""

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[Chunk, None]:
        async for chunk in super().stream(replace(request, max_tokens=1000)):
            yield chunk


async def test_an_upstream_that_ignores_the_limit_is_cut_at_it() -> None:
    service = _Service(_Unbounded(tokens=50, token_delay=0))
    run = _run(service, max_tokens=3)
    assert len(await _drain(run)) == 3 and run.tokens == 3
    assert run.finish_reason == "length"


async def test_one_outcome_whoever_finishes_and_however_often() -> None:
    service = _Service(MockProvider(tokens=2, token_delay=0), record_delay=0.05)
    run = _run(service)
    await _drain(run)
    first, second = await asyncio.gather(run.finish("completed"), run.finish("failed", "x"))
    assert first is second
    assert service.recorded == [("completed", None, 2)] and service.released == ["completed"]


async def test_the_outcome_is_recorded_even_when_its_caller_is_cancelled() -> None:
    service = _Service(MockProvider(tokens=2, token_delay=0), record_delay=0.05)
    run = _run(service)
    await _drain(run)
    caller = asyncio.ensure_future(run.finish("cancelled"))
    await asyncio.sleep(0.01)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    finished = await run.finish("failed")  # a later call waits for the first outcome
    assert cast(Any, finished.generation)[0] == "cancelled"
    assert service.recorded == [("cancelled", None, 2)]


async def test_an_upstream_failure_is_observed_and_raised() -> None:
    service = _Service(MockProvider(tokens=10, token_delay=0, fail_after=3))
    run = _run(service)
    with pytest.raises(ProviderError):
        await _drain(run)
    assert run.tokens == 3 and service.upstream_errors == ["unavailable"]
    await run.finish("failed", "upstream")
    assert service.recorded == [("failed", "upstream", 3)]


async def test_a_run_cancelled_elsewhere_ends_at_its_next_piece() -> None:
    service = _Service(MockProvider(tokens=10, token_delay=0))
    run = _run(service)
    await run.__anext__()
    run.stop_from_elsewhere()
    with pytest.raises(GenerationEnded):
        await run.__anext__()
    await run.finish("cancelled")
    run.stop_from_elsewhere()  # once finishing, nothing changes
    assert service.recorded == [("cancelled", None, 1)]
