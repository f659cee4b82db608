"""Generations: run a provider stream, count what it produced, and record the outcome.

A `GenerationRun` is driven by whoever sends the tokens (the HTTP layer) and ends with exactly
one `finish()`, whatever happened: completed, cancelled (client gone), or failed (upstream
error, limit, shutdown). The row is inserted before the first upstream byte, so a worker that
dies mid-stream leaves a `streaming` row that the sweeper marks failed later."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Collection, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, Protocol
from uuid import UUID

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from app.db.engine import Database
from app.db.generations import GenerationRepository
from app.db.items import ItemRepository
from app.domain.errors import (
    AlreadyExists,
    GenerationEnded,
    IdempotencyKeyInProgress,
    InvalidInput,
    NotFound,
    Overloaded,
    StreamLimitExceeded,
    UnknownModel,
)
from app.domain.ids import uuid7
from app.domain.models import Generation, Item
from app.domain.principal import Principal
from app.lifecycle import Lifecycle
from app.providers.base import Chunk, CompletionRequest, Message, Provider, ProviderError

log = logging.getLogger(__name__)

# How long a stream at its token limit waits for the upstream's closing usage chunk.
TRAILER_SECONDS = 1.0
# A running stream's row is saved at least this often (its heartbeat), tokens or not; one
# whose heartbeat is older than ABANDONED_AFTER_SECONDS lost its worker (SIGKILL, a node
# gone) and is failed by the sweeper, so a client following it elsewhere gets its end.
HEARTBEAT_SECONDS = 5.0
ABANDONED_AFTER_SECONDS = 20.0
# What the sweep knows, not a guess: a worker that could not write the stream's end through an
# outage is as silent as one that stopped.
ABANDONED_ERROR = (
    f"abandoned: no word from its serving process for {ABANDONED_AFTER_SECONDS:g} s"
    " before the stream ended (the process stopped, or could not reach the database)"
)
ABANDONED_SWEEP_SECONDS = 5.0
_tracer = trace.get_tracer("app.generations")

Outcome = Literal["completed", "cancelled", "failed"]


@dataclass(frozen=True, slots=True)
class StreamLimits:
    max_concurrent: int = 1000  # per worker process
    max_seconds: float = 300.0
    max_tokens: int = 4096
    max_prompt_chars: int = 32_000


class StreamQuota(Protocol):
    """Per-caller limits shared across workers (implemented by app.security.ratelimit)."""

    async def admit(self, key: str) -> None:
        """Raise RateLimited when the caller may not start another stream."""
        ...

    async def release(self, key: str, tokens: int) -> None: ...


class GenerationObserver(Protocol):
    """What the telemetry layer wants to know about streams (implemented by AppMetrics)."""

    def stream_started(self, provider: str) -> None: ...
    def first_token(self, provider: str, seconds: float) -> None: ...
    def stream_finished(self, provider: str, outcome: Outcome, tokens: int) -> None: ...
    def upstream_error(self, provider: str, kind: str) -> None: ...


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class Finished:
    generation: Generation
    item_version: int | None = None  # the item's version after the text was stored


class GenerationRun:
    """One stream. Iterate for chunks with text; `finish()` records the outcome once."""

    def __init__(
        self,
        service: GenerationService,
        generation_id: UUID,
        request: CompletionRequest,
        *,
        kind: str,
        item_id: UUID | None,
        idempotency_key: str | None,
        created_at: datetime,
        quota_key: str | None = None,
    ) -> None:
        self.id = generation_id
        self.model = request.model
        self.created = created_at
        self.kind = kind
        self.item_id = item_id
        self.idempotency_key = idempotency_key
        self.replayed = False
        self._service = service
        self._request = request
        self._chunks: AsyncGenerator[Chunk, None] | None = None
        self._started = time.monotonic()
        self.deadline = self._started + service.limits.max_seconds
        self._ttft: float | None = None
        self._parts: list[str] = []
        self.tokens = 0
        self.chars = 0  # characters produced so far: the id of the last token event
        self.cancelled_elsewhere = False  # its row was cancelled (DELETE, from any pod)
        self.prompt_tokens: int | None = None
        self.finish_reason: str | None = None
        self._finishing: asyncio.Future[Finished] | None = None
        self.quota_key = quota_key  # whose stream slot and token budget this uses
        self._span: Span | None = None
        if trace.get_current_span().is_recording():
            self._span = _tracer.start_span(
                f"chat {request.model}",
                kind=SpanKind.CLIENT,
                attributes={
                    "gen_ai.operation.name": "chat",
                    "gen_ai.provider.name": service.provider.name,
                    "gen_ai.request.model": request.model,
                    "gen_ai.request.max_tokens": request.max_tokens,
                    "itemstream.generation.id": str(generation_id),
                },
            )

    @property
    def provider(self) -> str:
        return self._service.provider.name

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def __aiter__(self) -> GenerationRun:
        return self

    async def __anext__(self) -> str:
        """The next piece of text. Raises ProviderError when the upstream fails."""
        if self._chunks is None:
            self._chunks = self._service.provider.stream(self._request)
        while True:
            if self.cancelled_elsewhere:
                raise GenerationEnded(f"generation {self.id} was cancelled")
            if self.tokens >= self._request.max_tokens:
                await self._read_trailer()
                self.finish_reason = self.finish_reason or "length"
                raise StopAsyncIteration
            with (
                trace.use_span(self._span, record_exception=False, set_status_on_exception=False)
                if self._span
                else nullcontext()
            ):
                try:
                    chunk = await self._chunks.__anext__()
                except ProviderError as error:
                    self._service.observe_upstream_error(error)
                    raise
            if chunk.usage is not None:
                self.prompt_tokens = chunk.usage.prompt_tokens
            if chunk.finish_reason is not None:
                self.finish_reason = chunk.finish_reason
            if chunk.text:
                if self._ttft is None:
                    self._ttft = time.monotonic() - self._started
                    self._service.observe_first_token(self._ttft)
                    if self._span is not None:
                        self._span.add_event("gen_ai.first_token", {"seconds": self._ttft})
                self.tokens += 1
                self.chars += len(chunk.text)
                self._parts.append(chunk.text)
                self._service.checkpoints.mark(self)
                return chunk.text

    async def _read_trailer(self) -> None:
        """At the token limit, the upstream (told the same limit) still owes its finish reason
        and usage (prompt tokens): read what follows without text, briefly, then stop."""
        assert self._chunks is not None
        try:
            async with asyncio.timeout(TRAILER_SECONDS):
                while True:
                    chunk = await self._chunks.__anext__()
                    if chunk.usage is not None:
                        self.prompt_tokens = chunk.usage.prompt_tokens
                    if chunk.finish_reason is not None:
                        self.finish_reason = chunk.finish_reason
                    if chunk.text or chunk.usage is not None:
                        return  # the usage comes last; more text would be past the limit
        except (StopAsyncIteration, TimeoutError, ProviderError):
            return

    @property
    def time_to_first_token(self) -> float | None:
        return self._ttft

    def stop_from_elsewhere(self) -> None:
        """Its row is no longer `streaming` (cancelled by a client, on any pod): the next
        piece of text ends the run instead."""
        if self._finishing is None:
            self.cancelled_elsewhere = True

    async def finish(self, outcome: Outcome, error: str | None = None) -> Finished:
        """Record the outcome and release the stream slot. The first call decides the outcome
        and runs to the end even if its caller is cancelled; later calls wait for it. Raises
        DatabaseUnavailable when the row cannot be written (the sweeper fails it later)."""
        if self._finishing is None:
            self._finishing = asyncio.ensure_future(self._finish(outcome, error))
        return await asyncio.shield(self._finishing)

    async def _finish(self, outcome: Outcome, error: str | None) -> Finished:
        self._service.checkpoints.forget(self)  # the record carries the whole text
        chunks, self._chunks = self._chunks, None
        duration = time.monotonic() - self._started
        try:
            if chunks is not None:
                await chunks.aclose()  # closes the upstream connection if still open
            return await self._service.record(self, outcome, error, duration)
        finally:
            if self._span is not None:
                self._end_span(outcome, error)
            await self._service.release(self, outcome)

    def _end_span(self, outcome: Outcome, error: str | None) -> None:
        assert self._span is not None
        span, self._span = self._span, None
        span.set_attribute("gen_ai.usage.output_tokens", self.tokens)
        span.set_attribute("itemstream.generation.outcome", outcome)
        if self.finish_reason:
            span.set_attribute("gen_ai.response.finish_reasons", [self.finish_reason])
        if outcome == "failed":
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()


class ReplayedRun:
    """A completed generation asked for again (same item and Idempotency-Key): its stored
    text, with no upstream call and nothing written."""

    replayed = True

    def __init__(self, generation: Generation, max_seconds: float) -> None:
        self.id = generation.id
        self.model = generation.model
        self.created = generation.created_at
        self.provider = generation.provider
        self.tokens = generation.completion_tokens
        self.prompt_tokens = generation.prompt_tokens
        self.finish_reason = generation.finish_reason
        self.deadline = time.monotonic() + max_seconds
        self.chars = len(generation.output or "")
        self._pending = [generation.output or ""]
        self._finished = Finished(generation)

    def __aiter__(self) -> ReplayedRun:
        return self

    async def __anext__(self) -> str:
        if self._pending:
            return self._pending.pop()
        raise StopAsyncIteration

    async def finish(self, outcome: Outcome, error: str | None = None) -> Finished:
        return self._finished


class FollowedRun:
    """A generation read from its record, from a character offset on (`Last-Event-ID`):
    what a reconnecting client gets, on any worker or pod, while the generation runs (its
    text as the producing worker saves it) or after it ended. No upstream call."""

    replayed = True

    def __init__(self, service: GenerationService, generation: Generation, after: int) -> None:
        self.id = generation.id
        self.model = generation.model
        self.created = generation.created_at
        self.chars = after
        self.deadline = time.monotonic() + service.limits.max_seconds
        self._service = service
        self._generation = generation

    @property
    def tokens(self) -> int:
        return self._generation.completion_tokens

    @property
    def prompt_tokens(self) -> int | None:
        return self._generation.prompt_tokens

    @property
    def finish_reason(self) -> str | None:
        return self._generation.finish_reason

    def __aiter__(self) -> FollowedRun:
        return self

    async def __anext__(self) -> str:
        while True:
            generation = self._generation
            output = generation.output or ""
            if len(output) > self.chars:
                text, self.chars = output[self.chars :], len(output)
                return text
            if generation.status == "completed":
                raise StopAsyncIteration
            if generation.status != "streaming":
                raise GenerationEnded(
                    f"generation {generation.id} {generation.status}: {generation.error}"
                )
            await asyncio.sleep(self._service.checkpoints.interval)
            self._generation = await self._service.reread(generation)

    async def finish(self, outcome: Outcome, error: str | None = None) -> Finished:
        generation = self._generation
        return Finished(generation, await self._service.stored_version(generation))


class Checkpoints:
    """The text of a worker's running streams, saved together every `interval`: a resumed
    stream on any pod reads it, and a row found no longer streaming (cancelled elsewhere)
    stops its run."""

    def __init__(self, db: Database, interval: float) -> None:
        self.interval = interval
        self._db = db
        self._dirty: dict[UUID, GenerationRun] = {}
        # Every running stream and when its row was last saved (time.monotonic()): one that
        # waits for tokens is saved too every HEARTBEAT_SECONDS, so its heartbeat goes on.
        self._running: dict[UUID, tuple[GenerationRun, float]] = {}

    def begin(self, run: GenerationRun) -> None:
        self._running[run.id] = (run, time.monotonic())

    def mark(self, run: GenerationRun) -> None:
        self._dirty[run.id] = run

    def forget(self, run: GenerationRun) -> None:
        self._dirty.pop(run.id, None)
        self._running.pop(run.id, None)

    async def save(self) -> None:
        now = time.monotonic()
        due = {
            run.id: run for run, saved in self._running.values() if now - saved >= HEARTBEAT_SECONDS
        }
        runs = list({**due, **self._dirty}.values())
        self._dirty = {}
        if not runs:
            return
        progress = [(run.id, run.text, run.tokens) for run in runs]
        try:
            async with self._db.write_one() as session:
                streaming = await GenerationRepository(session).checkpoint(progress, _now())
        except BaseException:
            for run in runs:  # saved next time (unless finished meanwhile)
                self._dirty.setdefault(run.id, run)
            raise
        for run in runs:
            if run.id in self._running:
                self._running[run.id] = (run, now)
            if run.id not in streaming:
                run.stop_from_elsewhere()

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.save()
            except Exception as error:  # the database may be down; the next round retries
                log.warning("saving stream progress failed: %s", error)


class Run(Protocol):
    """What the sender of a stream sees: a live generation or a replayed one."""

    id: UUID
    model: str
    created: datetime
    replayed: bool
    chars: int  # characters of text sent so far, this piece included (the event id)
    deadline: float  # time.monotonic() after which the stream must end

    @property
    def tokens(self) -> int: ...
    @property
    def prompt_tokens(self) -> int | None: ...
    @property
    def finish_reason(self) -> str | None: ...

    def __aiter__(self) -> Run: ...
    async def __anext__(self) -> str: ...
    async def finish(self, outcome: Outcome, error: str | None = None) -> Finished: ...


class GenerationService:
    def __init__(
        self,
        db: Database,
        provider: Provider,
        *,
        model: str,
        models: Collection[str] = (),
        limits: StreamLimits | None = None,
        lifecycle: Lifecycle | None = None,
        observer: GenerationObserver | None = None,
        quota: StreamQuota | None = None,
        checkpoint_seconds: float = 1.0,
    ) -> None:
        self._db = db
        self._quota = quota
        self.provider = provider
        self.default_model = model
        # The models a caller may ask for (LLM_MODELS): the upstream is reached under the
        # operator's key, so a client never picks a model the operator did not offer.
        self.models = frozenset(models) | {model}
        self.limits = limits or StreamLimits()
        self._lifecycle = lifecycle
        self._observer = observer
        self._active = 0
        self.checkpoints = Checkpoints(db, checkpoint_seconds)

    # --- starting -------------------------------------------------------------------------

    async def start_chat(
        self,
        caller: Principal,
        messages: tuple[Message, ...],
        *,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> GenerationRun:
        """A chat completion in the caller's tenant."""
        if model is not None and model not in self.models:
            raise UnknownModel(
                f"The model '{model}' does not exist or you do not have access to it."
            )
        request = self._request(messages, model, max_tokens, temperature, headers)
        return await self._start(
            request,
            kind="chat",
            item_id=None,
            idempotency_key=None,
            principal=caller,
            tenant=caller.tenant,
        )

    async def start_for_item(
        self,
        caller: Principal,
        item_id: UUID,
        *,
        instructions: str | None = None,
        max_tokens: int | None = None,
        idempotency_key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Run:
        """Stream a text about one of the caller's items (its generation belongs to the item's
        tenant); on completion it is stored on the item, once. With a key, a repeated request
        replays the completed generation (409 while it runs)."""
        async with self._db.read() as session:
            item = await ItemRepository(session).get(item_id, tenant=caller.reach)
            existing = None
            if item is not None and idempotency_key is not None:
                existing = await GenerationRepository(session).find_live_by_key(
                    item_id, idempotency_key
                )
        if item is None:
            raise NotFound(f"item {item_id} not found")
        if existing is not None:
            if existing.status == "completed":
                return ReplayedRun(existing, self.limits.max_seconds)
            raise IdempotencyKeyInProgress(
                f"generation {existing.id} for this Idempotency-Key is still running"
            )
        request = self._request(_item_prompt(item, instructions), None, max_tokens, None, headers)
        return await self._start(
            request,
            kind="item",
            item_id=item_id,
            idempotency_key=idempotency_key,
            principal=caller,
            tenant=item.tenant,
        )

    def _request(
        self,
        messages: tuple[Message, ...],
        model: str | None,
        max_tokens: int | None,
        temperature: float | None,
        headers: Mapping[str, str] | None,
    ) -> CompletionRequest:
        # A larger max_tokens is capped at the deployment's limit rather than refused: the
        # answer is the same as if the client had asked for the limit (finish_reason "length").
        limit = self.limits.max_tokens
        request = CompletionRequest(
            model=model or self.default_model,
            messages=messages,
            max_tokens=min(max_tokens, limit) if max_tokens else limit,
            temperature=temperature,
            headers=dict(headers or {}),
        )
        if request.prompt_chars > self.limits.max_prompt_chars:
            raise InvalidInput(
                f"the prompt has {request.prompt_chars} characters; the limit is "
                f"{self.limits.max_prompt_chars}",
                "messages",
            )
        return request

    async def _start(
        self,
        request: CompletionRequest,
        *,
        kind: str,
        item_id: UUID | None,
        idempotency_key: str | None,
        principal: Principal,
        tenant: str,
    ) -> GenerationRun:
        if self._lifecycle is not None and self._lifecycle.shutting_down:
            raise Overloaded("this instance is shutting down; retry on another", retry_after=1)
        if self._active >= self.limits.max_concurrent:
            raise Overloaded(
                f"this instance is serving its maximum of {self.limits.max_concurrent} streams",
                retry_after=1,
            )
        self._active += 1  # before the first await: admission is atomic within the worker
        quota = self._quota
        quota_key = principal.rate_key
        admitted = False
        generation_id = uuid7()
        now = _now()
        try:
            if quota is not None:
                await quota.admit(quota_key)
                admitted = True
            values = {
                "id": generation_id,
                "kind": kind,
                "item_id": item_id,
                "idempotency_key": idempotency_key,
                "provider": self.provider.name,
                "model": request.model,
                "status": "streaming",
                "created_at": now,
                "principal": principal.author,
                "tenant": tenant,
            }
            async with self._db.write_one() as session:
                await GenerationRepository(session).insert(values)
        except BaseException as error:
            self._active -= 1
            if admitted:
                assert quota is not None
                await quota.release(quota_key, 0)
            if isinstance(error, AlreadyExists):
                raise IdempotencyKeyInProgress(
                    "a generation for this Idempotency-Key is already running"
                ) from None
            raise
        if self._observer is not None:
            self._observer.stream_started(self.provider.name)
        run = GenerationRun(
            self,
            generation_id,
            request,
            kind=kind,
            item_id=item_id,
            idempotency_key=idempotency_key,
            created_at=now,
            quota_key=quota_key if quota is not None else None,
        )
        self.checkpoints.begin(run)
        return run

    # --- called by runs -------------------------------------------------------------------

    async def record(
        self, run: GenerationRun, outcome: Outcome, error: str | None, duration: float
    ) -> Finished:
        now = _now()
        values = {
            "status": outcome,
            "error": error,
            "finish_reason": run.finish_reason if outcome == "completed" else None,
            "prompt_tokens": run.prompt_tokens,
            "completion_tokens": run.tokens,
            "time_to_first_token_seconds": run.time_to_first_token,
            "duration_seconds": duration,
            "output": run.text,
            "finished_at": now,
        }
        item_version = None
        async with self._db.transaction() as session:
            repo = GenerationRepository(session)
            moved = await repo.finish(run.id, values)
            if moved and outcome == "completed" and run.item_id is not None:
                item_version = await repo.store_on_item(run.item_id, run.text, run.id, now)
            generation = await repo.get(run.id, tenant=None)
        assert generation is not None
        return Finished(generation, item_version)

    async def release(self, run: GenerationRun, outcome: Outcome) -> None:
        self._active -= 1
        if self._observer is not None:
            self._observer.stream_finished(self.provider.name, outcome, run.tokens)
        if run.quota_key is not None and self._quota is not None:
            try:
                await self._quota.release(run.quota_key, run.tokens)
            except Exception as error:  # the limiter's slot expires by itself
                log.warning("could not release the caller's stream slot: %s", error)

    def observe_first_token(self, seconds: float) -> None:
        if self._observer is not None:
            self._observer.first_token(self.provider.name, seconds)

    def observe_upstream_error(self, error: ProviderError) -> None:
        if self._observer is not None:
            self._observer.upstream_error(self.provider.name, error.kind)

    async def collect(self, run: GenerationRun) -> str:
        """Run a generation to its end without streaming (non-streaming chat completions)."""
        outcome: Outcome = "cancelled"
        error: str | None = "the request was cancelled"
        try:
            async with asyncio.timeout(max(0.0, run.deadline - time.monotonic())):
                async for _ in run:
                    pass
            outcome, error = "completed", None
        except TimeoutError:
            outcome, error = "failed", "the generation reached its maximum duration"
            raise StreamLimitExceeded(error) from None
        except ProviderError as failure:
            outcome, error = "failed", failure.detail
            raise
        finally:
            await run.finish(outcome, error)
        return run.text

    # --- reading and housekeeping ---------------------------------------------------------

    async def get(self, caller: Principal, generation_id: UUID) -> Generation:
        """One of the caller's generations (another tenant's is not found)."""
        async with self._db.read() as session:
            generation = await GenerationRepository(session).get(generation_id, tenant=caller.reach)
        if generation is None:
            raise NotFound(f"generation {generation_id} not found")
        return generation

    async def reread(self, generation: Generation) -> Generation:
        """A generation already shown to its caller, as it is now."""
        async with self._db.read() as session:
            found = await GenerationRepository(session).get(generation.id, tenant=None)
        if found is None:
            raise NotFound(f"generation {generation.id} not found")
        return found

    async def follow(self, caller: Principal, generation_id: UUID, after: int) -> FollowedRun:
        """The generation's events after character `after` (a token event's id)."""
        return FollowedRun(self, await self.get(caller, generation_id), after)

    async def stored_version(self, generation: Generation) -> int | None:
        """The item's version if it still carries this generation's text."""
        if generation.item_id is None or generation.status != "completed":
            return None
        async with self._db.read() as session:
            item = await ItemRepository(session).get(generation.item_id, tenant=None)
        return item.version if item is not None and item.generation_id == generation.id else None

    async def cancel(self, caller: Principal, generation_id: UUID) -> Generation:
        """Cancel one of the caller's running generations, wherever it runs: its row is marked
        `cancelled` now, and the worker producing it stops at its next save. An ended one is
        left as it is."""
        reach = caller.reach
        async with self._db.transaction() as session:
            repo = GenerationRepository(session)
            await repo.cancel(generation_id, "cancelled by a client", _now(), tenant=reach)
            generation = await repo.get(generation_id, tenant=reach)
        if generation is None:
            raise NotFound(f"generation {generation_id} not found")
        return generation

    async def sweep_abandoned(self) -> int:
        """Mark streams failed whose worker died: no heartbeat for ABANDONED_AFTER_SECONDS
        (rows of a release without heartbeats: older than the longest possible stream).
        Not within ABANDONED_AFTER_SECONDS of this process finding the database unavailable
        on any path (its own sweep included, for a worker that runs no stream): after an
        outage every worker's heartbeats are late, and their streams are alive."""
        if time.monotonic() - self._db.unavailable_at < ABANDONED_AFTER_SECONDS:
            return 0
        now = _now()
        cutoff = now - timedelta(seconds=self.limits.max_seconds + 60)
        silent_since = now - timedelta(seconds=ABANDONED_AFTER_SECONDS)
        async with self._db.transaction() as session:
            repository = GenerationRepository(session)
            return await repository.abandon_stale(cutoff, silent_since, now, ABANDONED_ERROR)


def _item_prompt(item: Item, instructions: str | None) -> tuple[Message, ...]:
    facts = [f"Name: {item.name}", f"Price: {item.price}"]
    if item.description:
        facts.append(f"Current description: {item.description}")
    task = instructions or "Write a short, factual product description for this item."
    return (
        Message("system", "You write concise product copy. Use only the facts given."),
        Message("user", task + "\n\n" + "\n".join(facts)),
    )
