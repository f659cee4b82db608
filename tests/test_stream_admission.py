"""Overload is fair and explicit: past STREAM_MAX_CONCURRENT a new stream is refused at once
with 503 and Retry-After, and the streams already admitted keep their pace to the end."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from app.db.migrations import migrate
from tests.support.app import make_settings
from tests.support.http_servers import running_app

ADMITTED = 4
TOKENS = 20
TOKEN_DELAY = 0.05


def body() -> dict[str, object]:
    return {
        "model": "itemstream-mock",
        "stream": True,
        "messages": [{"role": "user", "content": "go"}],
    }


async def test_past_the_limit_new_streams_get_503_at_once_and_admitted_ones_keep_pace(
    tmp_path: Path,
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'admission.db'}"
    await migrate(make_settings(url).db.app_url)
    settings = make_settings(
        url,
        stream_max_concurrent=ADMITTED,
        mock_tokens=TOKENS,
        mock_token_delay=TOKEN_DELAY,
        rate_limit_enabled=False,
    )
    async with running_app(settings) as base, httpx.AsyncClient(base_url=base, timeout=30) as c:
        all_admitted = asyncio.Event()
        started = 0
        gaps: list[float] = []

        async def admitted() -> int:
            nonlocal started
            chunks = 0
            async with c.stream("POST", "/v1/chat/completions", json=body()) as response:
                assert response.status_code == 200
                last = None
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    now = time.monotonic()
                    if last is not None and all_admitted.is_set():
                        gaps.append(now - last)
                    last = now
                    if chunks == 0:
                        started += 1
                        if started == ADMITTED:
                            all_admitted.set()
                    chunks += 1
            return chunks

        streams = [asyncio.create_task(admitted()) for _ in range(ADMITTED)]
        await asyncio.wait_for(all_admitted.wait(), 10)

        async def refused() -> tuple[int, str | None, float]:
            asked = time.monotonic()
            response = await c.post("/v1/chat/completions", json=body())
            return (
                response.status_code,
                response.headers.get("retry-after"),
                time.monotonic() - asked,
            )

        flood = await asyncio.gather(*(refused() for _ in range(30)))
        chunks = await asyncio.gather(*streams)

    assert {status for status, _, _ in flood} == {503}, flood
    assert all(retry_after == "1" for _, retry_after, _ in flood)
    slowest = max(seconds for _, _, seconds in flood)
    assert slowest < 1.0, f"a refusal took {slowest:.2f}s: refused streams must not wait"
    # Every admitted stream ran to its end (a role chunk, the tokens, the final chunk) and
    # kept its pace while the flood was refused: no gap near a whole stream's length.
    assert all(count >= TOKENS for count in chunks), chunks
    assert gaps and max(gaps) < TOKEN_DELAY * 10, f"an admitted stream stalled {max(gaps):.2f}s"
