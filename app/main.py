"""Application factory. Nothing happens at import time: engines, clients and telemetry are
created in the lifespan, once per worker process."""

from __future__ import annotations

import asyncio
import gc
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, get_args

from fastapi import FastAPI, Request
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import RedirectResponse

from app import __version__
from app.api import docs as api_docs
from app.api import edge, problems
from app.api import openapi as api_contract
from app.api.access import AccessControl
from app.api.deps import Components
from app.api.middleware import BodySizeLimit, HardeningHeaders, HeadAsGet, HostAllowlist
from app.api.routes import chat, health, items
from app.api.routes import generations as generations_routes
from app.config import Settings
from app.db.engine import Database, create_engine
from app.lifecycle import Lifecycle, process_lifecycle
from app.providers.base import ErrorKind, Provider
from app.providers.factory import create_provider
from app.security.ratelimit import Bucket, LimiterQuota, RateLimiter
from app.security.tokens import TokenVerifier
from app.services.admission import QueryGate
from app.services.generations import (
    ABANDONED_SWEEP_SECONDS,
    GenerationService,
    Outcome,
    StreamLimits,
)
from app.services.health import HealthService
from app.services.items import ItemPolicy, ItemService
from app.telemetry import tracing
from app.telemetry.metrics import AppMetrics
from app.telemetry.metrics import instrument as instrument_metrics

log = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL = 900.0
# The collector's young generation every 10,000 net allocations instead of 700, and each older
# one 20 times less often than the one below instead of 10: with thousands of open streams
# every collection walks all their objects. `bench/profile.py streams` (10,000 streams at
# 500/s on one worker): time to first token p99 1.1 s -> 0.2 s, a quarter less worker CPU.
GC_THRESHOLDS = (10_000, 20, 20)


async def _every(interval: float, what: str, job: Callable[[], Awaitable[int]]) -> None:
    """Run `job` periodically (jittered, so workers and pods do not line up); never raises."""
    while True:
        await asyncio.sleep(interval * random.uniform(0.5, 1.5))  # noqa: S311 - not crypto
        try:
            count = await job()
            if count:
                log.info("%s: %d rows", what, count)
        except Exception as error:  # the database may be down; try again next round
            log.warning("%s failed: %s", what, error)


async def _refresh_gauges(database: Database, metrics: AppMetrics, interval: float = 1.0) -> None:
    while True:
        await asyncio.sleep(interval)
        database.report_pool_usage()
        metrics.event_loop_tasks.set(len(asyncio.all_tasks()))


DESCRIPTION = """
Items on PostgreSQL, with idempotent creates, optimistic concurrency (ETag / If-Match),
offset and keyset pagination, literal case-insensitive search, soft and hard deletes.

Token streams over Server-Sent Events: an OpenAI-compatible `/v1/chat/completions` and
item-grounded generations, each recorded in `/v1/generations/{id}`.

Errors are `application/problem+json` (RFC 9457); the OpenAI-compatible endpoint uses
OpenAI's error shape. A 503 with `Retry-After` means the
database is unreachable right now; retry after the given seconds.
"""


def _access(
    settings: Settings, metrics: AppMetrics | None
) -> tuple[TokenVerifier | None, RateLimiter | None]:
    verifier = None
    if settings.auth.mode == "jwt":
        verifier = TokenVerifier(
            issuer=settings.auth.issuer,
            audience=settings.auth.audience,
            jwks_url=settings.auth.jwks_url,
            algorithms=tuple(settings.auth.algorithms),
            leeway_seconds=settings.auth.leeway_seconds,
            jwks_cache_seconds=settings.auth.jwks_cache_seconds,
            jwks_min_refresh_seconds=settings.auth.jwks_min_refresh_seconds,
            tenant_claim=settings.auth.tenant_claim,
            verified_tokens_cached=settings.auth.verified_tokens_cached,
        )
    elif settings.auth.mode == "hs256":
        assert settings.auth.hs256_secret is not None
        log.warning("AUTH_MODE=hs256: shared-secret tokens, for development only")
        verifier = TokenVerifier(
            issuer=settings.auth.issuer,
            audience=settings.auth.audience,
            hs256_secret=settings.auth.hs256_secret.get_secret_value(),
            leeway_seconds=settings.auth.leeway_seconds,
            tenant_claim=settings.auth.tenant_claim,
            verified_tokens_cached=settings.auth.verified_tokens_cached,
        )
    else:
        log.warning(
            "AUTH_MODE=none: every caller is anonymous with every scope, in one tenant. Set "
            "AUTH_MODE=jwt (with AUTH_ISSUER and AUTH_AUDIENCE) for anything but local "
            "development"
        )
    limiter = None
    if settings.rate_limit.enabled:
        redis = None
        if settings.rate_limit.redis_url:
            from app.security.redis_client import connect

            redis = connect(settings.rate_limit.redis_url, settings.rate_limit.redis_timeout)
        else:
            log.warning("rate limits without REDIS_URL are counted per worker process")
        limiter = RateLimiter(
            redis,
            requests=Bucket(
                "requests", settings.rate_limit.requests, settings.rate_limit.window_seconds
            ),
            tokens=Bucket(
                "tokens", settings.rate_limit.tokens, settings.rate_limit.tokens_window_seconds
            ),
            auth_failures=Bucket(
                "auth_failures",
                settings.rate_limit.auth_failures,
                settings.rate_limit.window_seconds,
            ),
            max_streams=settings.rate_limit.streams,
            stream_ttl_seconds=int(settings.streams.max_seconds) + 60,
            fail_mode=settings.rate_limit.fail_mode,
            observer=metrics,
            timeout=settings.rate_limit.redis_timeout,
            breaker_seconds=settings.rate_limit.breaker_seconds,
        )
    return verifier, limiter


def _add_middleware(app: FastAPI, settings: Settings) -> None:
    # Added last runs first. Outside all of these: the edge (metrics, sampling, access log,
    # hardening headers; see `create_app`), then the server span for sampled requests.
    app.add_middleware(HeadAsGet)
    app.add_middleware(BodySizeLimit, limit=settings.server.max_body_bytes)
    if settings.server.cors.allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.server.cors.allow_origins,
            allow_credentials=settings.server.cors.allow_credentials,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "If-Match",
                "If-None-Match",
                "Idempotency-Key",
            ],
            expose_headers=[
                "ETag",
                "Location",
                "Link",
                "Retry-After",
                "Idempotent-Replayed",
                "RateLimit",
                "RateLimit-Policy",
            ],
        )
    if settings.server.allowed_hosts:
        app.add_middleware(HostAllowlist, allowed=settings.server.allowed_hosts)


@dataclass(slots=True)
class _Opened:
    """What a worker opens at start and closes at shutdown, besides the components."""

    database: Database
    probe_db: Database
    provider: Provider
    verifier: TokenVerifier | None
    limiter: RateLimiter | None

    async def close(self) -> None:
        await self.provider.aclose()
        if self.verifier is not None:
            await self.verifier.aclose()
        if self.limiter is not None:
            await self.limiter.aclose()
        await self.database.dispose()
        await self.probe_db.dispose()


def build_components(
    settings: Settings, lifecycle: Lifecycle, metrics: AppMetrics | None
) -> tuple[Components, _Opened]:
    """The components and what they hold open, wired from the settings (no I/O yet)."""
    database = Database(
        create_engine(settings.db),
        observer=metrics,
        pooler=settings.db.pooler,
        request_timeout=settings.db.request_timeout,
    )
    # Readiness gets a connection of its own: it must answer within the probe's timeout
    # whatever the request pool is doing.
    probe_db = Database(
        create_engine(settings.db, pool_size=1),
        pooler=settings.db.pooler,
        request_timeout=settings.db.readiness_timeout,
    )
    policy = ItemPolicy(
        idempotency_ttl=timedelta(seconds=settings.items.idempotency_ttl_seconds),
        require_if_match=settings.items.require_if_match,
        export_max_seconds=settings.items.export_max_seconds,
        default_page_size=settings.items.default_page_size,
        max_page_size=settings.items.max_page_size,
        cursor_keys=settings.items.cursor_keys,
        max_offset=settings.items.max_offset,
        list_window=settings.items.list_window,
        expensive=QueryGate(
            settings.items.expensive_query_concurrency,
            settings.items.expensive_query_queue_seconds,
            settings.items.expensive_query_timeout,
            settings.items.expensive_query_share,
        ),
    )
    provider = create_provider(settings.llm)
    if metrics is not None:
        metrics.expect_provider(provider.name, get_args(Outcome), get_args(ErrorKind))
    verifier, limiter = _access(settings, metrics)
    generations = GenerationService(
        database,
        provider,
        model=settings.llm.model,
        models=settings.llm.served_models,
        limits=StreamLimits(
            max_concurrent=settings.streams.max_concurrent,
            max_seconds=settings.streams.max_seconds,
            max_tokens=settings.streams.max_tokens,
            max_prompt_chars=settings.streams.max_prompt_chars,
        ),
        lifecycle=lifecycle,
        observer=metrics,
        quota=LimiterQuota(limiter) if limiter is not None else None,
        checkpoint_seconds=settings.streams.checkpoint_seconds,
    )
    components = Components(
        settings=settings,
        items=ItemService(database, policy),
        health=HealthService(probe_db, lifecycle),
        generations=generations,
        lifecycle=lifecycle,
        access=AccessControl(settings.auth, verifier, limiter),
    )
    return components, _Opened(database, probe_db, provider, verifier, limiter)


def _background_jobs(
    components: Components, database: Database, metrics: AppMetrics | None
) -> list[asyncio.Task[Any]]:
    jobs: list[asyncio.Task[Any]] = [
        # Says at once in the log whether the schema serves this release (and which
        # migration is pending if not), instead of at the first probe.
        asyncio.create_task(components.health.readiness()),
        asyncio.create_task(
            _every(
                HOUSEKEEPING_INTERVAL,
                "purge expired idempotency keys",
                components.items.purge_expired_idempotency_keys,
            )
        ),
        asyncio.create_task(
            _every(
                ABANDONED_SWEEP_SECONDS,
                "fail generations abandoned by dead workers",
                components.generations.sweep_abandoned,
            )
        ),
        asyncio.create_task(components.generations.checkpoints.run_forever()),
    ]
    if metrics is not None:
        jobs.append(asyncio.create_task(_refresh_gauges(database, metrics)))
    if components.access.limiter is not None:
        # A connection and the scripts loaded before the first requests need them.
        jobs.append(asyncio.create_task(components.access.limiter.warm()))
    return jobs


def _lifespan(
    settings: Settings, lifecycle: Lifecycle
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lifecycle.bind(asyncio.get_running_loop())
        metrics: AppMetrics | None = app.state.metrics
        components, opened = build_components(settings, lifecycle, metrics)
        app.state.components = components
        jobs = _background_jobs(components, opened.database, metrics)
        # What start-up created (modules, routes, schemas: most of the heap) lives as long as
        # the process: keep it out of the collector's full passes, which otherwise traverse
        # all of it every few hundred requests (tens of milliseconds each, seen in p99).
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        try:
            yield
        finally:
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            await opened.close()
            tracing.flush()

    return lifespan


def _add_routes(app: FastAPI, settings: Settings) -> None:
    if settings.server.docs_enabled:
        api_docs.install(app, "itemstream")

        async def root(request: Request) -> RedirectResponse:
            # A first look at the address finds the docs.
            return RedirectResponse(request.scope.get("root_path", "") + api_docs.SWAGGER)

        app.add_route("/", root, include_in_schema=False)
    problems.install(app, retry_after_seconds=settings.db.retry_after_seconds)
    api_contract.install(app, settings)
    for module in (health, items, generations_routes, chat):
        app.include_router(module.router)


def create_app(settings: Settings | None = None, lifecycle: Lifecycle | None = None) -> FastAPI:
    """The app: routes and middleware now; components, pools and jobs in its lifespan."""
    settings = settings or Settings()
    if problems := settings.serving_problems():
        raise ValueError("; ".join(problems))
    lifecycle = lifecycle or process_lifecycle
    tracing.configure(settings.telemetry.otel)  # no-op when gunicorn's post_fork already did it
    app = FastAPI(
        title="itemstream",
        version=__version__,
        description=DESCRIPTION,
        lifespan=_lifespan(settings, lifecycle),
        docs_url=None,  # self-hosted below: no CDN
        redoc_url=None,
        openapi_url="/openapi.json" if settings.server.docs_enabled else None,
        # FastAPI's own OpenTelemetry layer would observe every request a second time: the
        # edge and the instrumentation below do it once.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    _add_routes(app, settings)
    _add_middleware(app, settings)
    metrics = (
        instrument_metrics(app, expose=settings.telemetry.metrics_port is None)
        if settings.telemetry.metrics_enabled
        else None
    )
    app.state.metrics = metrics
    tracing.instrument_app(app)
    edge.install(
        app,
        metrics=metrics,
        sampler=tracing.head_sampler(),
        headers=HardeningHeaders(settings.server.hsts_seconds)
        if settings.server.security_headers
        else None,
    )
    return app
