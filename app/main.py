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
from app.services.health import HealthService
from app.services.items import ItemPolicy, ItemService

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


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        database = Database(create_engine(settings))
        policy = ItemPolicy(
            idempotency_ttl=timedelta(seconds=settings.idempotency_ttl_seconds),
            require_if_match=settings.require_if_match,
        )
        app.state.services = Services(
            settings=settings,
            items=ItemService(database, policy),
            health=HealthService(database, head_revision()),
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
            app.state.services.health.shutting_down = True
            purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await purger
            await database.dispose()

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

    # Added last = outermost.
    if settings.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allow_origins,
            allow_credentials=settings.cors_allow_credentials,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Content-Type", "If-Match", "If-None-Match", "Idempotency-Key"],
            expose_headers=["ETag", "Location", "Link", "Retry-After", "Idempotent-Replayed"],
        )
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    return app
