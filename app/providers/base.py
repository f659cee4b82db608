"""What the app needs from an LLM: a stream of text chunks for a chat request."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

Role = Literal["system", "user", "assistant", "tool", "developer"]
# rate_limited -> 429, timeout -> 504, rejected -> the upstream's 4xx, unavailable -> 502.
ErrorKind = Literal["rate_limited", "timeout", "rejected", "unavailable"]


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    model: str
    messages: tuple[Message, ...]
    max_tokens: int
    temperature: float | None = None
    # W3C trace context to forward upstream (traceparent, tracestate).
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def prompt_chars(self) -> int:
        return sum(len(message.content) for message in self.messages)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of the answer. The last chunk may carry only a finish reason and usage."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None


class ProviderError(Exception):
    """The upstream failed. `detail` is safe to show to clients."""

    def __init__(
        self,
        kind: ErrorKind,
        detail: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        retriable: bool = False,
    ) -> None:
        super().__init__(detail)
        self.retriable = retriable  # safe to try again (before the first token only)
        self.kind = kind
        self.detail = detail
        self.status = status  # the upstream's HTTP status, when it sent one
        self.retry_after = retry_after


class Provider(Protocol):
    name: str

    def stream(self, request: CompletionRequest) -> AsyncGenerator[Chunk, None]:
        """An async generator: the caller must `aclose()` it when it stops early, which
        closes the upstream connection."""
        ...

    async def aclose(self) -> None: ...
