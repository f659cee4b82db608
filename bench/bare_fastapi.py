"""Bare FastAPI: the service's routes with Pydantic request validation, the asyncpg pool used
directly, each response JSON-encoded once, no middleware. With BENCH_INSTRUMENTED=1 the same
app gets the standard instrumentations: prometheus-fastapi-instrumentator and
opentelemetry-instrumentation-fastapi (10 % parent-based sampling, batched OTLP export to
OTEL_EXPORTER_OTLP_ENDPOINT). What a careful team gets from FastAPI and the usual libraries.

Run: gunicorn -k uvicorn_worker.UvicornWorker 'bench.bare_fastapi:app' (LIMIT_DSN set)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

import asyncpg
from fastapi import FastAPI, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from bench.limit_server import COLUMNS, noop_reset, to_json


class ItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(None, max_length=10_000)
    price: Decimal = Field(ge=0, max_digits=12, decimal_places=2)
    is_active: bool = True


class PricePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    price: Decimal = Field(ge=0, max_digits=12, decimal_places=2)


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body, default=to_json), status, media_type="application/json")


pool: asyncpg.Pool | None = None


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    global pool  # noqa: PLW0603
    pool = await asyncpg.create_pool(
        os.environ["LIMIT_DSN"], min_size=10, max_size=10, reset=noop_reset
    )
    yield
    await pool.close()


app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None)


def _pool() -> asyncpg.Pool:
    assert pool is not None
    return pool


@app.get("/readyz")
async def readyz() -> Response:
    return _json({"status": "ok"})


@app.get("/v1/items")
async def list_items(
    per_page: Annotated[int, Query(ge=1, le=100)] = 20,
    is_active: bool | None = None,
    min_price: Decimal | None = None,
    max_price: Decimal | None = None,
    q: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    conditions: list[str] = ["deleted_at IS NULL"]
    args: list[object] = []
    for value, condition in (
        (is_active, "is_active = ${}"),
        (min_price, "price >= ${}"),
        (max_price, "price <= ${}"),
    ):
        if value is not None:
            args.append(value)
            conditions.append(condition.format(len(args)))
    if q:
        args.append("%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        conditions.append(f"(name ILIKE ${len(args)} OR description ILIKE ${len(args)})")
    rows = await _pool().fetch(
        f"SELECT {COLUMNS} FROM items WHERE {' AND '.join(conditions)} "
        f"ORDER BY created_at DESC, id DESC LIMIT {per_page + 1}",
        *args,
    )
    return _json({"data": [dict(r.items()) for r in rows[:per_page]], "per_page": per_page})


@app.post("/v1/items", status_code=201)
async def create_item(body: ItemIn) -> Response:
    now = datetime.now(UTC)
    row = await _pool().fetchrow(
        f"INSERT INTO items (id, name, description, price, is_active, created_at, updated_at) "
        f"VALUES ($1, $2, $3, $4, $5, $6, $6) RETURNING {COLUMNS}",
        uuid.uuid4(),
        body.name,
        body.description,
        body.price,
        body.is_active,
        now,
    )
    return _json(dict(row.items()), 201)


@app.get("/v1/items/{item_id}")
async def get_item(item_id: uuid.UUID) -> Response:
    row = await _pool().fetchrow(
        f"SELECT {COLUMNS} FROM items WHERE id = $1 AND deleted_at IS NULL", item_id
    )
    return _json({"detail": "not found"}, 404) if row is None else _json(dict(row.items()))


@app.patch("/v1/items/{item_id}")
async def patch_item(item_id: uuid.UUID, body: PricePatch) -> Response:
    row = await _pool().fetchrow(
        f"UPDATE items SET price = $2, version = version + 1, updated_at = $3 "
        f"WHERE id = $1 AND deleted_at IS NULL RETURNING {COLUMNS}",
        item_id,
        body.price,
        datetime.now(UTC),
    )
    return _json({"detail": "not found"}, 404) if row is None else _json(dict(row.items()))


if os.environ.get("BENCH_INSTRUMENTED") == "1":
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from prometheus_fastapi_instrumentator import Instrumentator

    provider = TracerProvider(
        resource=Resource.create({"service.name": "bench-fastapi"}),
        sampler=ParentBased(TraceIdRatioBased(0.1)),
    )
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(f"{endpoint}/v1/traces")))
    trace.set_tracer_provider(provider)
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider, excluded_urls="readyz")
    Instrumentator(excluded_handlers=["/readyz", "/metrics"]).instrument(app).expose(app)
