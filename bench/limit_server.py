"""The practical limit: raw ASGI and an asyncpg pool, no framework, no ORM, no validation
beyond what the routes need. Same routes, data and database path as the service.

Run: gunicorn -k uvicorn_worker.UvicornWorker 'bench.limit_server:app' (DATABASE_URL set)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs

import asyncpg

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

COLUMNS = "id, name, description, price, is_active, version, created_at, updated_at, deleted_at"
pool: asyncpg.Pool | None = None


def to_json(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(type(value))


def _row(record: asyncpg.Record) -> dict[str, Any]:
    return dict(record.items())


async def noop_reset(connection: asyncpg.Connection) -> None:
    # asyncpg's default reset costs a round trip per release; nothing here changes session state.
    return None


async def _respond(send: Send, status: int, body: Any) -> None:
    payload = json.dumps(body, default=to_json).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


async def _body(receive: Receive) -> Any:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return json.loads(b"".join(chunks) or b"null")


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    global pool  # noqa: PLW0603
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                pool = await asyncpg.create_pool(
                    os.environ["LIMIT_DSN"], min_size=10, max_size=10, reset=noop_reset
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if pool is not None:
                    await pool.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    assert pool is not None
    path, method = scope["path"], scope["method"]
    if path == "/readyz":
        await _respond(send, 200, {"status": "ok"})
        return
    if path == "/v1/items" and method == "GET":
        query = {key: values[0] for key, values in parse_qs(scope["query_string"].decode()).items()}
        per_page = int(query.get("per_page", "20"))
        conditions, args = ["deleted_at IS NULL"], []
        if "is_active" in query:
            args.append(query["is_active"] == "true")
            conditions.append(f"is_active = ${len(args)}")
        if "min_price" in query:
            args.append(Decimal(query["min_price"]))
            conditions.append(f"price >= ${len(args)}")
        if "max_price" in query:
            args.append(Decimal(query["max_price"]))
            conditions.append(f"price <= ${len(args)}")
        if "q" in query:
            args.append(
                "%" + query["q"].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            )
            conditions.append(f"(name ILIKE ${len(args)} OR description ILIKE ${len(args)})")
        where = " AND ".join(conditions)
        rows = await pool.fetch(
            f"SELECT {COLUMNS} FROM items WHERE {where} ORDER BY created_at DESC, id DESC LIMIT {per_page + 1}",
            *args,
        )
        await _respond(
            send, 200, {"data": [_row(r) for r in rows[:per_page]], "per_page": per_page}
        )
        return
    if path == "/v1/items" and method == "POST":
        body = await _body(receive)
        now = datetime.now(UTC)
        row = await pool.fetchrow(
            f"INSERT INTO items (id, name, description, price, is_active, created_at, updated_at) "
            f"VALUES ($1, $2, $3, $4, $5, $6, $6) RETURNING {COLUMNS}",
            uuid.uuid4(),
            body["name"],
            body.get("description"),
            Decimal(str(body["price"])),
            body.get("is_active", True),
            now,
        )
        await _respond(send, 201, _row(row))
        return
    if path.startswith("/v1/items/"):
        item_id = uuid.UUID(path.rsplit("/", 1)[1])
        if method == "GET":
            row = await pool.fetchrow(
                f"SELECT {COLUMNS} FROM items WHERE id = $1 AND deleted_at IS NULL", item_id
            )
        elif method == "PATCH":
            body = await _body(receive)
            row = await pool.fetchrow(
                f"UPDATE items SET price = $2, version = version + 1, updated_at = $3 "
                f"WHERE id = $1 AND deleted_at IS NULL RETURNING {COLUMNS}",
                item_id,
                Decimal(str(body["price"])),
                datetime.now(UTC),
            )
        else:
            row = None
        if row is None:
            await _respond(send, 404, {"detail": "not found"})
        else:
            await _respond(send, 200, _row(row))
        return
    await _respond(send, 404, {"detail": "not found"})
