"""A deterministic provider: the same prompt always streams the same tokens, offline."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncGenerator

from app.providers.base import Chunk, CompletionRequest, ProviderError, Usage

_WORDS = [
    "stream",
    "item",
    "token",
    "signal",
    "vector",
    "cluster",
    "latency",
    "budget",
    "replica",
    "shard",
    "cache",
    "queue",
    "worker",
    "pool",
    "span",
    "metric",
    "trace",
    "gauge",
    "bucket",
    "window",
    "quorum",
    "leader",
    "lease",
    "commit",
    "batch",
    "cursor",
    "index",
    "page",
    "filter",
    "sort",
    "search",
    "price",
    "stock",
    "catalog",
    "order",
    "ledger",
    "audit",
]


class MockProvider:
    name = "mock"

    def __init__(
        self,
        *,
        tokens: int = 32,
        token_delay: float = 0.02,
        first_token_delay: float = 0.0,
        fail_after: int | None = None,
    ) -> None:
        self._tokens = tokens
        self._delay = token_delay
        self._first_delay = first_token_delay
        self._fail_after = fail_after

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[Chunk, None]:
        prompt = "\n".join(f"{m.role}:{m.content}" for m in request.messages)
        seed = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "big")
        pick = random.Random(seed).choice  # noqa: S311 - deterministic text, not crypto
        count = min(self._tokens, request.max_tokens)
        if self._first_delay:
            await asyncio.sleep(self._first_delay)
        for index in range(count):
            if self._fail_after is not None and index == self._fail_after:
                raise ProviderError("unavailable", f"mock upstream failed after {index} tokens")
            if index and self._delay:
                await asyncio.sleep(self._delay)
            yield Chunk(text=(" " if index else "") + pick(_WORDS))
        prompt_tokens = sum(len(m.content.split()) for m in request.messages)
        finish = "length" if count < self._tokens else "stop"
        yield Chunk(finish_reason=finish, usage=Usage(prompt_tokens, count))

    async def aclose(self) -> None:
        return None
