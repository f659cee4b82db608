"""Client load for fault tests: keyed creates (retried with the same Idempotency-Key until
acknowledged), reads and item generations, from several clients at once, until stopped; and
the checks every fault must pass (no status but 2xx and 503 + Retry-After, no request past
the bound, every acknowledged write stored exactly once)."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from tests.support.sse import each_event

# The chart's default (config.dbRequestTimeout), which PgBouncer's query_wait_timeout follows.
REQUEST_BOUND = 5.0


@dataclass
class Outcome:
    kind: str
    status: int
    started: float
    elapsed: float
    retry_after: str | None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass
class Stream:
    """One generation as its client saw it: the text received (across resumes), how often
    the client had to resume, and how it ended."""

    generation_id: str = ""
    received: str = ""
    last_id: str = ""
    resumes: int = 0
    status: str = ""
    error: str = ""  # the record's error, when it ended otherwise than completed
    errors: list[str] = field(default_factory=list)
    hung_up: list[float] = field(default_factory=list)  # when the client left on purpose
    resumed: list[float] = field(default_factory=list)  # when a resume was answered 200
    served_by: str = ""  # the instance that ran it (X-Served-By of a proxy in front)
    started: float = 0.0  # time.monotonic() when the generation was asked for
    ended: float = 0.0  # time.monotonic() when the client saw it end


@dataclass
class Load:
    base: str
    writers: int = 6
    readers: int = 6
    generations: int = 0
    generation_tokens: int = 0
    # Each generation client starts another generation when its last one ended, until
    # stopped (otherwise one each).
    repeat_generations: bool = False
    # Seconds between two generation clients' first requests: repeated streams of one length
    # would otherwise start and end in lockstep.
    generation_stagger: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)
    acknowledged: dict[str, int] = field(default_factory=dict)  # key -> items acknowledged
    attempted: set[str] = field(default_factory=set)
    streams: list[Stream] = field(default_factory=list)
    # Moments (time.monotonic()) at which every stream's client hangs up and resumes with
    # Last-Event-ID, as a browser whose connection drops does; a script may add to it.
    hang_ups: list[float] = field(default_factory=list)
    # Headers added to every request (e.g. X-Forwarded-For: a caller per request).
    headers: Callable[[], dict[str, str]] | None = None
    stopping: bool = False

    async def _call(self, client: httpx.AsyncClient, kind: str, request: httpx.Request) -> int:
        started = time.monotonic()
        try:
            response = await client.send(request)
            status, retry_after = response.status_code, response.headers.get("retry-after")
        except httpx.HTTPError:
            status, retry_after = 0, None  # a dropped connection is a failure too
        self.outcomes.append(
            Outcome(kind, status, started, time.monotonic() - started, retry_after)
        )
        return status

    async def _writer(self, client: httpx.AsyncClient) -> None:
        while not self.stopping:
            key = uuid.uuid4().hex
            self.attempted.add(key)
            request = client.build_request(
                "POST",
                "/v1/items",
                json={"name": key, "price": 1},
                headers={"Idempotency-Key": key},
            )
            give_up = time.monotonic() + 60
            while time.monotonic() < give_up:  # a started key is finished, even when stopping
                status = await self._call(client, "write", request)
                if status == 201:
                    self.acknowledged[key] = self.acknowledged.get(key, 0) + 1
                    break
                await asyncio.sleep(0.1)

    async def _reader(self, client: httpx.AsyncClient, index: int) -> None:
        while not self.stopping:
            url = "/v1/items?per_page=5" if index % 2 else "/v1/items?q=a&per_page=5"
            await self._call(client, "read", client.build_request("GET", url))
            await asyncio.sleep(0.01)

    async def _generations(self, client: httpx.AsyncClient, index: int) -> None:
        await asyncio.sleep(index * self.generation_stagger)
        await self._generation(client)
        while self.repeat_generations and not self.stopping:
            await self._generation(client)

    async def _generation(self, client: httpx.AsyncClient) -> None:
        """One long generation, read to its end: resumed with Last-Event-ID whenever the
        connection breaks (an instance gone), as an EventSource client does."""
        stream = Stream()
        self.streams.append(stream)
        while True:  # an item to generate for (its create may meet the outage too)
            response = await client.post("/v1/items", json={"name": "story", "price": 1})
            if response.status_code == 201:
                item_id = response.json()["id"]
                break
            await asyncio.sleep(0.2)
        give_up = time.monotonic() + 120
        while not stream.status and time.monotonic() < give_up:
            try:
                if not stream.generation_id:
                    request = client.build_request(
                        "POST",
                        f"/v1/items/{item_id}/generate",
                        json={"max_tokens": self.generation_tokens},
                    )
                    stream.started = time.monotonic()
                else:
                    stream.resumes += 1
                    request = client.build_request(
                        "GET",
                        f"/v1/generations/{stream.generation_id}/events",
                        headers={"Last-Event-ID": stream.last_id or "0"},
                    )
                response = await client.send(request, stream=True)
                try:
                    if response.status_code != 200:
                        stream.errors.append(f"{response.status_code}")
                        if response.status_code != 409:  # 409: it ended; its record says how
                            await asyncio.sleep(0.5)
                            continue
                    else:
                        if stream.resumes:
                            stream.resumed.append(time.monotonic())
                        else:
                            stream.served_by = response.headers.get("x-served-by", "")
                        await self._read_events(response, stream)
                finally:
                    await response.aclose()
                if not stream.status and stream.errors and stream.generation_id:
                    # An error event (or a 409) ends the connection; the record says whether
                    # the generation ended too (failed, cancelled) or goes on (resume it).
                    record = await client.get(f"/v1/generations/{stream.generation_id}")
                    if record.status_code == 200 and record.json()["status"] != "streaming":
                        stream.status = record.json()["status"]
                        stream.error = str(record.json().get("error"))
            except httpx.HTTPError as error:
                stream.errors.append(type(error).__name__)
                await asyncio.sleep(0.2)
        stream.ended = time.monotonic()

    async def _read_events(self, response: httpx.Response, stream: Stream) -> None:
        async for event, event_id, payload in each_event(response):
            if event == "generation":
                stream.generation_id = payload["generation_id"]
            elif event == "token":
                stream.received += payload["text"]
                stream.last_id = event_id or stream.last_id
                now = time.monotonic()
                due = [m for m in self.hang_ups if stream.started <= m <= now]
                if len(due) > len(stream.hung_up):
                    stream.hung_up.append(time.monotonic())
                    return  # closing the response drops the connection
            elif event == "done":
                stream.status = payload.get("status", "done")
            elif event == "error":
                stream.errors.append(json.dumps(payload)[:200])

    async def run(
        self, script: Awaitable[None], *, ready: Callable[[], bool] | None = None
    ) -> None:
        limits = httpx.Limits(max_connections=self.writers + self.readers + self.generations + 4)
        timeout = httpx.Timeout(REQUEST_BOUND + 10, read=REQUEST_BOUND + 30)
        hooks = {"request": [self._add_headers]} if self.headers is not None else {}
        async with httpx.AsyncClient(
            base_url=self.base, limits=limits, timeout=timeout, event_hooks=hooks
        ) as client:
            tasks = [asyncio.create_task(self._writer(client)) for _ in range(self.writers)]
            tasks += [asyncio.create_task(self._reader(client, i)) for i in range(self.readers)]
            streams = [
                asyncio.create_task(self._generations(client, i)) for i in range(self.generations)
            ]
            try:
                await script
            finally:
                self.stopping = True
                await asyncio.wait_for(asyncio.gather(*tasks, *streams), 150)

    async def _add_headers(self, request: httpx.Request) -> None:
        assert self.headers is not None
        request.headers.update(self.headers())

    def of(self, kind: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind == kind]

    def first_success_after(self, moment: float, kind: str | None = None) -> float:
        """Seconds from `moment` to the end of the first successful request that started
        after it."""
        return (
            min(
                (
                    o.started + o.elapsed
                    for o in self.outcomes
                    if o.ok and o.started >= moment and (kind is None or o.kind == kind)
                ),
                default=float("inf"),
            )
            - moment
        )

    def longest_gap(self, kind: str, after: float, before: float) -> float:
        """The longest stretch between `after` and `before` in which no request of `kind`
        succeeded: the outage clients saw (a request that waited and then succeeded counts
        as the wait)."""
        ends = sorted(
            o.started + o.elapsed
            for o in self.outcomes
            if o.kind == kind and o.ok and after <= o.started + o.elapsed <= before
        )
        points = [after, *ends, before]
        return max(b - a for a, b in itertools.pairwise(points))


def timeline(load: Load, kind: str, origin: float, before: int = 2, after: int = 15) -> str:
    """Per second around `origin` (an event): requests of `kind` that ended well/badly."""
    cells = []
    for second in range(-before, after):
        low, high = origin + second, origin + second + 1
        ended = [o for o in load.of(kind) if low <= o.started + o.elapsed < high]
        good = sum(1 for o in ended if o.ok)
        cells.append(f"{second:+d}s {good}/{len(ended) - good}")
    return " ".join(cells)


def unexplained_errors(load: Load, margin: float) -> list[str]:
    """What breaks the rules for faults: any status but 2xx and 503, a 503 without
    Retry-After, a request longer than the bound plus `margin`."""
    problems = []
    statuses = {o.status for o in load.outcomes}
    if not statuses <= {200, 201, 503}:
        problems.append(f"statuses {sorted(statuses)}")
    if any(o.status == 503 and not o.retry_after for o in load.outcomes):
        problems.append("a 503 without Retry-After")
    slow = sorted(
        (o for o in load.outcomes if o.elapsed > REQUEST_BOUND + margin),
        key=lambda o: -o.elapsed,
    )
    if slow:
        problems.append(
            f"{len(slow)} requests took longer than {REQUEST_BOUND + margin:g}s: "
            + ", ".join(f"{o.kind} {o.status} {o.elapsed:.2f}s" for o in slow[:5])
        )
    return problems


def slowest_answered(log: str) -> float:
    """The longest request (streams aside) the service itself measured, from its access log,
    in seconds. What a client sees beyond it was spent queueing before the service read the
    request (on a 2-core machine, beside the rig and the load generator)."""
    durations = [
        float(match.group(1)) / 1000
        for line in log.splitlines()
        if '"itemstream.access"' in line
        and "/generate" not in line
        and "/events" not in line  # a resumed stream
        for match in [re.search(r'"duration_ms": ([\d.]+)', line)]
        if match
    ]
    return max(durations, default=0.0)


def exactly_once(load: Load, stored: dict[str, int]) -> tuple[list[str], list[str], list[str]]:
    """(lost, duplicated, stored but never acknowledged) keys, given name -> rows stored."""
    lost = [key for key in load.acknowledged if stored.get(key, 0) == 0]
    duplicated = [key for key, n in stored.items() if key in load.attempted and n > 1]
    unacknowledged = [
        key for key in stored if key in load.attempted and key not in load.acknowledged
    ]
    return lost, duplicated, unacknowledged
