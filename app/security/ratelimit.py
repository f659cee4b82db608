"""Rate limits shared by every worker and pod: token buckets and stream slots kept in Redis,
updated atomically by Lua scripts that read Redis's own clock (no skew between pods). Without
Redis (the embedded default) the same buckets live in process memory, per worker.

Every Redis call is bounded by `timeout` (tens of milliseconds) and goes through a circuit
breaker (the `circuitbreaker` package): after three failures in a row the limiter stops asking
Redis for `breaker_seconds`, then tries again, so a Redis that hangs costs three timeouts per
breaker period, not one per call. While Redis is unreachable, or the breaker open, the
limiter fails open (serves, counts, logs) or closed (refuses with 503), as configured."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from cachetools import TTLCache
from circuitbreaker import CircuitBreaker

from app.domain.errors import RateLimited

log = logging.getLogger(__name__)

# Callers the in-process fallback tracks at most (least recently used forgotten first).
MAX_TRACKED_CALLERS = 50_000

FailMode = Literal["open", "closed"]

# KEYS[1]: bucket; ARGV: capacity, refill per second, cost, force (debit even below zero).
_BUCKET = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2]) / 1000
local cost = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil then tokens = capacity; ts = now_ms end
tokens = math.min(capacity, tokens + math.max(0, now_ms - ts) * rate)
local allowed = 0
if tokens >= cost or ARGV[4] == '1' then
  tokens = tokens - cost
  allowed = 1
end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'ts', now_ms)
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / rate) + 1000)
return {allowed, tostring(tokens)}
"""

# KEYS[1]: counter; ARGV: maximum, ttl seconds (a crashed worker's slots expire).
_ACQUIRE = """
local count = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
if count > tonumber(ARGV[1]) then
  redis.call('DECR', KEYS[1])
  return 0
end
return 1
"""

_RELEASE = """
local count = redis.call('DECR', KEYS[1])
if count < 0 then redis.call('SET', KEYS[1], 0) end
return count
"""


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    window_seconds: int
    retry_after: int  # seconds until one unit is available again (when refused)
    policy: str


class RateLimitBackendDown(Exception):
    """Redis is unreachable and the fail mode is closed."""


class BackendObserver(Protocol):
    def ratelimit_backend_error(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Bucket:
    name: str
    capacity: int
    window_seconds: int  # the capacity refills over this window

    @property
    def per_second(self) -> float:
        return self.capacity / self.window_seconds


class RateLimiter:
    def __init__(
        self,
        redis: Any | None,
        *,
        requests: Bucket,
        tokens: Bucket,
        max_streams: int,
        stream_ttl_seconds: int,
        auth_failures: Bucket | None = None,
        fail_mode: FailMode = "open",
        observer: BackendObserver | None = None,
        prefix: str = "itemstream:rl",
        max_tracked_callers: int = MAX_TRACKED_CALLERS,
        timeout: float = 0.05,
        breaker_seconds: float = 5.0,
    ) -> None:
        self._redis = redis
        self.requests = requests
        self.tokens = tokens
        # Refused tokens and scopes, per client address: cheap to send, so budgeted apart.
        self.auth_failures = auth_failures or Bucket("auth_failures", 30, 60)
        self._timeout = timeout
        # Three failures in a row, not one: a worker whose event loop lags under a burst may
        # see one reply late, and an open breaker stops limiting for the whole period.
        breaker = CircuitBreaker(
            failure_threshold=3,
            recovery_timeout=breaker_seconds,
            expected_exception=Exception,
            name=f"redis:{prefix}",
        )
        self._guarded: Callable[..., Awaitable[Any]] = breaker.decorate(self._bounded)
        self.max_streams = max_streams
        self._stream_ttl = stream_ttl_seconds
        self._fail_mode = fail_mode
        self._observer = observer
        self._prefix = prefix
        # Without Redis, per process: bounded however many distinct callers come (a flood of
        # addresses must not grow the worker), and forgotten once they could only be full.
        self._memory: TTLCache[str, tuple[float, float]] = TTLCache(
            maxsize=max_tracked_callers, ttl=max(requests.window_seconds, tokens.window_seconds)
        )
        self._slots: TTLCache[str, int] = TTLCache(
            maxsize=max_tracked_callers, ttl=stream_ttl_seconds
        )
        self._last_warning: dict[str, float] = {}
        if redis is not None:
            self._bucket_script = redis.register_script(_BUCKET)
            self._acquire_script = redis.register_script(_ACQUIRE)
            self._release_script = redis.register_script(_RELEASE)

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    async def warm(self) -> None:
        """Open a connection and load the scripts (EVALSHA then needs no SCRIPT LOAD round
        trip); best effort: a Redis that is down is met by the requests as usual."""
        if self._redis is None:
            return
        try:
            async with asyncio.timeout(max(self._timeout * 20, 1.0)):
                for script in (self._bucket_script, self._acquire_script, self._release_script):
                    await self._redis.script_load(script.script)
        except Exception as error:
            self._warn(f"could not reach the rate limit backend at start: {error}")

    async def _bounded(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        async with asyncio.timeout(self._timeout):
            return await script(keys=keys, args=args)

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """One script on Redis, within the timeout, unless the breaker is open
        (CircuitBreakerError, as any other failure)."""
        return await self._guarded(script, keys, args)

    # --- requests and generated tokens ----------------------------------------------------

    async def hit(self, key: str) -> Decision:
        """One request against the caller's request budget."""
        return await self._take(self.requests, key, 1, force=False)

    async def auth_failed(self, address: str) -> Decision:
        """A refused token or scope from `address`, against its budget of refusals."""
        return await self._take(self.auth_failures, f"addr:{address}", 1, force=False)

    async def tokens_left(self, key: str) -> Decision:
        """Whether the caller may start a generation (any token budget left)."""
        return await self._take(self.tokens, key, 0, force=False, need_positive=True)

    async def charge_tokens(self, key: str, count: int) -> None:
        """Debit what a finished stream produced (the budget may go below zero)."""
        if count > 0:
            await self._take(self.tokens, key, count, force=True)

    async def _take(
        self, bucket: Bucket, key: str, cost: int, *, force: bool, need_positive: bool = False
    ) -> Decision:
        full_key = f"{self._prefix}:{bucket.name}:{key}"
        try:
            if self._redis is None:
                allowed, left = self._take_memory(bucket, full_key, cost, force)
            else:
                raw = await self._call(
                    self._bucket_script,
                    [full_key],
                    [bucket.capacity, bucket.per_second, cost, int(force)],
                )
                allowed, left = bool(int(raw[0])), float(raw[1])
        except Exception as error:
            return self._backend_failed(bucket, error)
        if need_positive:
            allowed = left >= 1
        retry = 0 if allowed else max(1, math.ceil((max(cost, 1) - left) / bucket.per_second))
        return Decision(
            allowed=allowed,
            limit=bucket.capacity,
            remaining=max(0, math.floor(left)),
            window_seconds=bucket.window_seconds,
            retry_after=retry,
            policy=bucket.name,
        )

    def _take_memory(self, bucket: Bucket, key: str, cost: int, force: bool) -> tuple[bool, float]:
        now = time.monotonic()
        tokens, stamp = self._memory.get(key, (float(bucket.capacity), now))
        tokens = min(float(bucket.capacity), tokens + (now - stamp) * bucket.per_second)
        allowed = tokens >= cost or force
        if allowed:
            tokens -= cost
        self._memory[key] = (tokens, now)
        return allowed, tokens

    # --- concurrent streams ----------------------------------------------------------------

    async def acquire_stream(self, key: str) -> bool:
        full_key = f"{self._prefix}:streams:{key}"
        try:
            if self._redis is None:
                if self._slots.get(full_key, 0) >= self.max_streams:
                    return False
                self._slots[full_key] = self._slots.get(full_key, 0) + 1
                return True
            return bool(
                await self._call(
                    self._acquire_script, [full_key], [self.max_streams, self._stream_ttl]
                )
            )
        except Exception as error:
            return self._backend_failed(self.requests, error).allowed

    async def release_stream(self, key: str) -> None:
        full_key = f"{self._prefix}:streams:{key}"
        try:
            if self._redis is None:
                left = self._slots.get(full_key, 0) - 1
                if left > 0:
                    self._slots[full_key] = left
                else:
                    self._slots.pop(full_key, None)
                return
            await self._call(self._release_script, [full_key], [])
        except Exception as error:  # the slot expires with its TTL
            self._warn(f"could not release a stream slot: {error}")

    # --- Redis down ------------------------------------------------------------------------

    def _backend_failed(self, bucket: Bucket, error: Exception) -> Decision:
        if self._observer is not None:
            self._observer.ratelimit_backend_error()
        self._warn(f"rate limit backend unavailable (fail {self._fail_mode}): {error}")
        if self._fail_mode == "closed":
            raise RateLimitBackendDown("the rate limit backend is unavailable") from error
        return Decision(True, bucket.capacity, bucket.capacity, bucket.window_seconds, 0, "open")

    def _warn(self, message: str) -> None:
        # One line per kind of trouble per 10 s, not one per request.
        kind = message.split(":", 1)[0]
        now = time.monotonic()
        if now - self._last_warning.get(kind, -60.0) > 10:
            self._last_warning[kind] = now
            log.warning("%s", message)


def headers_for(decision: Decision) -> dict[str, str]:
    """IETF draft-ietf-httpapi-ratelimit-headers: the policy and what is left of it."""
    reset = decision.retry_after if not decision.allowed else 0
    return {
        "RateLimit-Policy": f'"{decision.policy}";q={decision.limit};w={decision.window_seconds}',
        "RateLimit": f'"{decision.policy}";r={decision.remaining};t={reset}',
    }


class LimiterQuota:
    """The generation service's view of the limiter: concurrent streams and the token budget
    of one caller (implements app.services.generations.StreamQuota)."""

    def __init__(self, limiter: RateLimiter) -> None:
        self._limiter = limiter

    async def admit(self, key: str) -> None:
        budget = await self._limiter.tokens_left(key)
        if not budget.allowed:
            raise RateLimited(
                "the generated-token budget of this caller is used up",
                budget.retry_after,
                headers_for(budget),
            )
        if not await self._limiter.acquire_stream(key):
            raise RateLimited(
                f"this caller already has {self._limiter.max_streams} streams open",
                1,
            )

    async def release(self, key: str, tokens: int) -> None:
        await self._limiter.release_stream(key)
        await self._limiter.charge_tokens(key, tokens)
