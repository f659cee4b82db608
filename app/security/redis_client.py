"""The rate limiter's Redis client, from REDIS_URL: redis-py's own for `redis://`,
`rediss://` and `unix://`; for `redis+sentinel://` a client of the primary the Sentinels
report (redis-py's Sentinel support), which asks them again whenever a connection to the
primary fails, and drops a connection that finds its server demoted (READONLY). Every call,
to Redis or to a Sentinel, is bounded by the limiter's timeout and never retried here: the
limiter's breaker and fail mode decide what a failure means."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.config import parse_redis_url


class _SentinelPrimary(Redis):
    """The primary's client, which closes the Sentinels' connections with its own."""

    sentinels: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinels is not None:
            await self.sentinels.aclose()


def connect(url: str, timeout: float) -> Redis:
    bounded: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        # No CLIENT SETINFO round trips on every new connection.
        "driver_info": None,
    }
    target = parse_redis_url(url)
    if target is None:
        return Redis.from_url(url, **bounded)
    credentials = {"username": target.username, "password": target.password}
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels), sentinel_kwargs={**bounded, **credentials}, **bounded
    )
    primary: _SentinelPrimary = sentinel.master_for(
        target.service,
        redis_class=_SentinelPrimary,
        db=target.db,
        username=target.username,
        password=target.password,
    )
    primary.sentinels = sentinel
    return primary
