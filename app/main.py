"""Application factory. Nothing happens at import time: engines, clients and telemetry are
created in the lifespan, once per worker process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from app.api import problems
from app.api.deps import Services
from app.api.middleware import BodySizeLimit
from app.api.routes import health, items
from app.config import Settings
from app.db.engine import Database, create_engine
from app.db.migrations import head_revision
from app.lifecycle import Lifecycle, process_lifecycle
from app.services.health import HealthService
from app.services.items import ItemPolicy, ItemService
from app.telemetry import tracing
from app.telemetry.access import AccessLog
from app.telemetry.metrics import AppMetrics
from app.telemetry.metrics import instrument as instrument_metrics

log = logging.getLogger(__name__)

IDEMPOTENCY_PURGE_INTERVAL = 900.0


async def _every(interval: float, job: Callable[[], Awaitable[int]]) -> None:
    """Run `job` periodically (jittered, so workers and pods do not line up); never raises."""
    while True:
        await asyncio.sleep(interval * random.uniform(0.5, 1.5))  # noqa: S311 - not crypto
        try:
            removed = await job()
            if removed:
                log.info("purged %d expired idempotency keys", removed)
        except Exception as error:  # the database may be down; try again next round
            log.warning("idempotency key purge failed: %s", error)


DESCRIPTION = """
Items on PostgreSQL, with idempotent creates, optimistic concurrency (ETag / If-Match),
offset and keyset pagination, literal case-insensitive search, soft and hard deletes.

Errors are `application/problem+json` (RFC 9457). A 503 with `Retry-After` means the
database is unreachable right now; retry after the given seconds.
"""


def create_app(settings: Settings | None = None, lifecycle: Lifecycle | None = None) -> FastAPI:
    settings = settings or Settings()
    lifecycle = lifecycle or process_lifecycle
    tracing.configure(settings)  # no-op when gunicorn's post_fork already did it

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lifecycle.bind(asyncio.get_running_loop())
        engine = create_engine(settings)
        tracing.instrument_engine(engine)
        database = Database(engine, observer=metrics, pooler=settings.db_pooler)
        policy = ItemPolicy(
            idempotency_ttl=timedelta(seconds=settings.idempotency_ttl_seconds),
            require_if_match=settings.require_if_match,
        )
        app.state.services = Services(
            settings=settings,
            items=ItemService(database, policy),
            health=HealthService(database, head_revision(), lifecycle),
        )
        purger = asyncio.create_task(
            _every(
                IDEMPOTENCY_PURGE_INTERVAL, app.state.services.items.purge_expired_idempotency_keys
            ),
            name="purge-idempotency-keys",
        )
        try:
            yield
        finally:
            purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await purger
            await database.dispose()
            tracing.flush()

    docs = settings.docs_enabled
    app = FastAPI(
        title="itemstream",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    problems.install(app, retry_after_seconds=settings.db_retry_after_seconds)
    app.include_router(health.router)
    app.include_router(items.router)

    # Middleware: added last runs first. Order from the outside in: tracing (server span),
    # HTTP metrics, access log (inside the span, so it has the trace id), CORS, body limit.
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    if settings.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allow_origins,
            allow_credentials=settings.cors_allow_credentials,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Content-Type", "If-Match", "If-None-Match", "Idempotency-Key"],
            expose_headers=["ETag", "Location", "Link", "Retry-After", "Idempotent-Replayed"],
        )
    app.add_middleware(AccessLog)
    metrics: AppMetrics | None = None
    if settings.metrics_enabled:
        metrics = instrument_metrics(app, expose=settings.metrics_port is None)
    tracing.instrument_app(app)
    return app
