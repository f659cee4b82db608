"""Any OpenAI-compatible `/v1/chat/completions` upstream (vLLM, OpenAI, Ollama, LiteLLM).

One pooled httpx client per worker, made in the lifespan. The upstream request is opened
inside the generator, so closing the generator (client gone, deadline, shutdown) closes the
upstream connection and a server such as vLLM stops generating."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from app.providers.base import Chunk, CompletionRequest, ProviderError, Usage

log = logging.getLogger(__name__)

# Worth one more attempt, before the first token only (nothing was sent to our client yet).
_RETRY_STATUSES = frozenset({500, 502, 503})
_MAX_ERROR_BODY = 4096


@dataclass(slots=True)
class _Progress:
    started: bool = False  # a chunk went to the caller: no retry after that


class OpenAICompatibleProvider:
    name = "openai"

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 120.0,
        max_connections: int = 1000,
        retries: int = 1,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Accept": "text/event-stream"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # httpx's defaults (5 s read, 100 connections) break long streams: read is the longest
        # gap between two tokens (the time to first token included), and the pool must hold
        # every concurrent stream of this worker.
        self.client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(connect=connect_timeout, read=read_timeout, write=10.0, pool=5.0),
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=min(max_connections, 100),
                keepalive_expiry=30.0,
            ),
            transport=transport,
        )
        self._retries = retries

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[Chunk, None]:
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "stream": True,
            "max_tokens": request.max_tokens,
            "stream_options": {"include_usage": True},
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        attempt = 0
        while True:
            progress = _Progress()
            try:
                async with aclosing(self._attempt(body, request.headers, progress)) as chunks:
                    async for chunk in chunks:
                        yield chunk
                return
            except ProviderError as error:
                if progress.started or not error.retriable or attempt >= self._retries:
                    raise
            attempt += 1
            log.info("retrying the upstream request (attempt %d)", attempt + 1)
            await asyncio.sleep(0.1 * attempt)

    async def _attempt(
        self, body: dict[str, Any], headers: Mapping[str, str], progress: _Progress
    ) -> AsyncGenerator[Chunk, None]:
        try:
            async with self.client.stream(
                "POST", "/chat/completions", json=body, headers=dict(headers)
            ) as response:
                if response.status_code != 200:
                    raise await _status_error(response)
                finished = False
                async for chunk in _chunks(response):
                    progress.started = True
                    finished = finished or chunk.finish_reason is not None
                    yield chunk
                if not finished:
                    raise ProviderError("unavailable", "the upstream ended the stream early")
        except httpx.TimeoutException as error:
            # Only a connect timeout is safe to retry: nothing reached the upstream.
            retriable = isinstance(error, httpx.ConnectTimeout)
            raise ProviderError("timeout", _describe(error), retriable=retriable) from error
        except httpx.TransportError as error:
            retriable = isinstance(error, httpx.ConnectError)
            raise ProviderError("unavailable", _describe(error), retriable=retriable) from error

    async def aclose(self) -> None:
        await self.client.aclose()


def _describe(error: httpx.HTTPError) -> str:
    text = str(error) or type(error).__name__
    return f"upstream {type(error).__name__}: {text}"[:300]


async def _chunks(response: httpx.Response) -> AsyncGenerator[Chunk, None]:
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # comments (keep-alives), event names, blank separators
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            payload = json.loads(data)
        except ValueError as error:
            raise ProviderError("unavailable", "the upstream sent a malformed chunk") from error
        if not isinstance(payload, dict):
            raise ProviderError("unavailable", "the upstream sent a malformed chunk")
        if "error" in payload:
            raise ProviderError("unavailable", f"upstream error: {_error_message(payload)}")
        yield _chunk(payload)


def _chunk(payload: dict[str, Any]) -> Chunk:
    text = ""
    finish = None
    choices = payload.get("choices") or []
    if choices and isinstance(choices[0], dict):
        delta = choices[0].get("delta") or {}
        text = delta.get("content") or ""
        finish = choices[0].get("finish_reason")
    usage = None
    raw_usage = payload.get("usage")
    if isinstance(raw_usage, dict):
        usage = Usage(
            int(raw_usage.get("prompt_tokens") or 0), int(raw_usage.get("completion_tokens") or 0)
        )
    return Chunk(text=text, finish_reason=finish, usage=usage)


async def _status_error(response: httpx.Response) -> ProviderError:
    raw = b""
    async for part in response.aiter_bytes():
        raw += part
        if len(raw) >= _MAX_ERROR_BODY:
            break
    try:
        message = _error_message(json.loads(raw))
    except ValueError:
        message = raw[:200].decode(errors="replace")
    status = response.status_code
    detail = f"upstream returned {status}" + (f": {message}" if message else "")
    if status == 429:
        retry_after = _retry_after(response.headers.get("retry-after"))
        return ProviderError("rate_limited", detail, status=status, retry_after=retry_after)
    if status in _RETRY_STATUSES:
        return ProviderError("unavailable", detail, status=status, retriable=True)
    if status in (400, 404, 413, 422):
        return ProviderError("rejected", detail, status=status)
    if status in (408, 504):
        return ProviderError("timeout", detail, status=status)
    return ProviderError("unavailable", detail, status=status)


def _error_message(payload: Any) -> str:
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict):
            return str(error.get("message") or "")[:300]
        return str(error)[:300]
    return ""


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None
