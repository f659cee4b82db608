"""Stream and export measurements for `make bench`: many concurrent SSE streams held by one
worker, and the NDJSON/CSV export of a large table. Clients are raw asyncio sockets, so the
load generator costs little next to the server."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass

import httpx

from harness.processes import memory_kib


@dataclass
class StreamsResult:
    requested: int
    established: int  # first token received while all were held
    completed: int
    failed: int
    failures: dict[str, int]  # by status line or error
    rss_idle_mib: float
    rss_peak_mib: float
    ttft_p50_ms: float
    ttft_p99_ms: float

    @property
    def kib_per_stream(self) -> float:
        if not self.established:
            return 0.0
        return (self.rss_peak_mib - self.rss_idle_mib) * 1024 / self.established


async def _one_stream(
    port: int, ready: asyncio.Event, ttfts: list[float], outcome: dict[str, int]
) -> None:
    body = json.dumps(
        {
            "model": "itemstream-mock",
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        }
    ).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    started = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as error:
        _fail(outcome, type(error).__name__)
        return
    try:
        writer.write(request)
        status = await reader.readline()
        if b" 200 " not in status:
            _fail(outcome, status.decode(errors="replace").strip()[9:12] or "closed")
            return
        seen_token = False
        while True:
            line = await reader.readline()
            if not line:
                break
            if not seen_token and b'"content":"' in line and b'"content":""' not in line:
                seen_token = True
                ttfts.append(time.monotonic() - started)
                outcome["established"] += 1
                await ready.wait()
            if line.startswith(b"0\r\n") or b"data: [DONE]" in line:
                outcome["completed"] += 1
                break
    except (OSError, asyncio.IncompleteReadError) as error:
        _fail(outcome, type(error).__name__)
    finally:
        writer.close()


def _fail(outcome: dict[str, int], reason: str) -> None:
    outcome["failed"] += 1
    outcome[f"failed: {reason}"] = outcome.get(f"failed: {reason}", 0) + 1


async def hold_streams(port: int, worker: int, count: int, ramp_per_s: int) -> StreamsResult:
    """Open `count` streams at `ramp_per_s`, wait until every one has its first token (all are
    open at once: tokens keep coming for longer than the ramp), read the worker's RSS, then
    let them all finish."""
    rss_idle = memory_kib(worker) / 1024
    ready = asyncio.Event()
    ttfts: list[float] = []
    outcome = {"established": 0, "completed": 0, "failed": 0}
    tasks = []
    batch = max(1, ramp_per_s // 10)
    for start in range(0, count, batch):
        for _ in range(min(batch, count - start)):
            tasks.append(asyncio.create_task(_one_stream(port, ready, ttfts, outcome)))
        await asyncio.sleep(0.1)
    deadline = time.monotonic() + 60
    while outcome["established"] + outcome["failed"] < count and time.monotonic() < deadline:  # noqa: ASYNC110 - counts, bounded
        await asyncio.sleep(0.2)
    peak = memory_kib(worker) / 1024
    ready.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 300)
    ordered = sorted(ttfts) or [0.0]
    return StreamsResult(
        requested=count,
        established=outcome["established"],
        completed=outcome["completed"],
        failed=outcome["failed"],
        failures={k[8:]: v for k, v in outcome.items() if k.startswith("failed: ")},
        rss_idle_mib=round(rss_idle, 1),
        rss_peak_mib=round(peak, 1),
        ttft_p50_ms=round(statistics.median(ordered) * 1000, 1),
        ttft_p99_ms=round(
            ordered[int(len(ordered) * 0.99) - 1 if len(ordered) > 1 else 0] * 1000, 1
        ),
    )


@dataclass
class ExportResult:
    rows: int
    seconds: float
    rss_before_mib: float
    rss_peak_mib: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def export(base: str, worker: int, fmt: str) -> ExportResult:
    before = memory_kib(worker) / 1024
    rows = 0
    started = time.monotonic()
    with httpx.stream("GET", f"{base}/v1/items/export", params={"format": fmt}, timeout=600) as r:
        r.raise_for_status()
        for chunk in r.iter_raw(1 << 20):
            rows += chunk.count(b"\n")
    elapsed = time.monotonic() - started
    if fmt == "csv":
        rows -= 1  # header
    return ExportResult(
        rows, round(elapsed, 2), round(before, 1), round(memory_kib(worker, "VmHWM") / 1024, 1)
    )
