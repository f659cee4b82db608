"""All SQL for generations, and for storing a completed generation on its item."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from datetime import datetime
from functools import cache
from typing import Any
from uuid import UUID

from sqlalchemy import and_, bindparam, insert, literal_column, or_, select, text, update
from sqlalchemy.sql import Executable

from app.db.errors import is_unique_violation
from app.db.session import Session
from app.db.tables import generations, items
from app.domain.errors import AlreadyExists
from app.domain.models import Generation

# Every field of the domain's Generation, in its order (rows are built as Generation(*row)).
_COLUMNS = tuple(generations.c[field.name] for field in fields(Generation))
_INSERTED = (
    "id",
    "kind",
    "item_id",
    "idempotency_key",
    "provider",
    "model",
    "status",
    "principal",
    "tenant",
)
_FINISHED = (
    "status",
    "error",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "time_to_first_token_seconds",
    "duration_seconds",
    "output",
    "finished_at",
)


def _insert(dialect: str) -> Executable:
    values: dict[str, Any] = {name: bindparam(f"g_{name}") for name in _INSERTED}
    values["created_at"] = bindparam("g_created_at", type_=generations.c.created_at.type)
    values["heartbeat_at"] = bindparam("g_created_at", type_=generations.c.created_at.type)
    return insert(generations).values(values)


def _one(scoped: bool) -> list[Any]:
    """The generation by its id, within the caller's tenant unless the caller reaches every
    tenant (another tenant's generation is not found, as one that does not exist)."""
    conditions = [generations.c.id == bindparam("g_id")]
    if scoped:
        conditions.append(generations.c.tenant == bindparam("g_tenant"))
    return conditions


@cache
def _get(scoped: bool) -> Any:
    def build(dialect: str) -> Executable:
        return select(*_COLUMNS).where(*_one(scoped))

    return build


def _find_live_by_key(dialect: str) -> Executable:
    return select(*_COLUMNS).where(
        generations.c.item_id == bindparam("g_item_id"),
        generations.c.idempotency_key == bindparam("g_key"),
        # Literal values: an expanding IN list would need render-time compilation.
        generations.c.status.in_([literal_column("'streaming'"), literal_column("'completed'")]),
    )


def _finish(dialect: str) -> Executable:
    # Only a streaming row moves: the one transition that can apply a result, exactly once.
    return (
        update(generations)
        .where(generations.c.id == bindparam("g_id"), generations.c.status == "streaming")
        .values(
            {name: bindparam(f"g_{name}", type_=generations.c[name].type) for name in _FINISHED}
        )
        .returning(generations.c.id)
    )


def _store_on_item(dialect: str) -> Executable:
    return (
        update(items)
        .where(items.c.id == bindparam("i_id"), items.c.deleted_at.is_(None))
        .values(
            generated_text=bindparam("i_text"),
            generation_id=bindparam("i_generation_id"),
            updated_at=bindparam("i_now", type_=items.c.updated_at.type),
            version=items.c.version + 1,
        )
        .returning(items.c.version)
    )


def _checkpoint(dialect: str) -> Executable:
    """Save the text so far of many streaming rows at once; returns the ids still streaming
    (a row that is not was cancelled from elsewhere, or swept)."""
    if dialect == "postgresql":
        return text(
            "UPDATE generations AS g SET output = v.output, completion_tokens = v.tokens, "
            "heartbeat_at = :g_now "
            "FROM unnest(CAST(:g_ids AS uuid[]), CAST(:g_outputs AS text[]), "
            "CAST(:g_tokens AS integer[])) AS v(id, output, tokens) "
            "WHERE g.id = v.id AND g.status = 'streaming' RETURNING g.id"
        ).bindparams(bindparam("g_now", type_=generations.c.heartbeat_at.type))
    return (  # SQLite (development): one row per statement
        update(generations)
        .where(generations.c.id == bindparam("g_id"), generations.c.status == "streaming")
        .values(
            output=bindparam("g_output"),
            completion_tokens=bindparam("g_tokens"),
            heartbeat_at=bindparam("g_now", type_=generations.c.heartbeat_at.type),
        )
        .returning(generations.c.id)
    )


@cache
def _cancel(scoped: bool) -> Any:
    def build(dialect: str) -> Executable:
        return (
            update(generations)
            .where(*_one(scoped), generations.c.status == "streaming")
            .values(
                status="cancelled",
                error=bindparam("g_error"),
                finished_at=bindparam("g_now", type_=generations.c.finished_at.type),
            )
            .returning(generations.c.id)
        )

    return build


def _abandon(dialect: str) -> Executable:
    stamp = generations.c.created_at.type
    return (
        update(generations)
        .where(
            generations.c.status == "streaming",
            or_(
                # Its worker stopped refreshing the heartbeat.
                generations.c.heartbeat_at < bindparam("g_silent_since", type_=stamp),
                # Started by a release without heartbeats, and older than any stream can be.
                and_(
                    generations.c.heartbeat_at.is_(None),
                    generations.c.created_at < bindparam("g_before", type_=stamp),
                ),
            ),
        )
        .values(
            status="failed",
            error=bindparam("g_error", type_=generations.c.error.type),
            finished_at=bindparam("g_now", type_=generations.c.finished_at.type),
        )
    )


def _scope(params: dict[str, Any], tenant: str | None) -> dict[str, Any]:
    if tenant is not None:
        params["g_tenant"] = tenant
    return params


class GenerationRepository:
    def __init__(self, session: Session) -> None:
        self._s = session

    async def insert(self, values: Mapping[str, Any]) -> None:
        """Raises AlreadyExists when a generation with the item's Idempotency-Key runs."""
        params = {f"g_{name}": values[name] for name in (*_INSERTED, "created_at")}
        try:
            await self._s.execute("insert_generation", _insert, params)
        except Exception as error:
            if is_unique_violation(error):
                raise AlreadyExists("a generation with this Idempotency-Key exists") from None
            raise

    async def get(self, generation_id: UUID, *, tenant: str | None) -> Generation | None:
        """The generation, if it exists in `tenant` (None: in any tenant)."""
        scoped = tenant is not None
        params = _scope({"g_id": generation_id}, tenant)
        row = await self._s.fetch_one(("get_generation", scoped), _get(scoped), params)
        return None if row is None else Generation(*row)

    async def find_live_by_key(self, item_id: UUID, key: str) -> Generation | None:
        params = {"g_item_id": item_id, "g_key": key}
        row = await self._s.fetch_one("find_generation_by_key", _find_live_by_key, params)
        return None if row is None else Generation(*row)

    async def finish(self, generation_id: UUID, values: Mapping[str, Any]) -> bool:
        """False when the generation was no longer streaming (already finished or swept)."""
        params = {f"g_{name}": values.get(name) for name in _FINISHED}
        params["g_id"] = generation_id
        return await self._s.fetch_one("finish_generation", _finish, params) is not None

    async def store_on_item(
        self, item_id: UUID, text: str, generation_id: UUID, now: datetime
    ) -> int | None:
        """The item's new version, or None when it is gone or soft-deleted."""
        params = {"i_id": item_id, "i_text": text, "i_generation_id": generation_id, "i_now": now}
        row = await self._s.fetch_one("store_generation_on_item", _store_on_item, params)
        return None if row is None else int(row[0])

    async def checkpoint(
        self, progress: Sequence[tuple[UUID, str, int]], now: datetime
    ) -> set[UUID]:
        """Save (id, text so far, tokens) of streaming rows, and their heartbeat; the ids
        that are still streaming."""
        if not progress:
            return set()
        if self._s.dialect == "postgresql":
            params = {
                "g_ids": [row[0] for row in progress],
                "g_outputs": [row[1] for row in progress],
                "g_tokens": [row[2] for row in progress],
                "g_now": now,
            }
            rows = await self._s.fetch_all("checkpoint_generations", _checkpoint, params)
            return {UUID(str(row[0])) for row in rows}
        streaming = set()
        for generation_id, output, tokens in progress:
            params = {"g_id": generation_id, "g_output": output, "g_tokens": tokens, "g_now": now}
            if await self._s.fetch_one("checkpoint_generation", _checkpoint, params):
                streaming.add(generation_id)
        return streaming

    async def cancel(
        self, generation_id: UUID, error: str, now: datetime, *, tenant: str | None
    ) -> bool:
        """Mark a streaming row cancelled; False when it had already ended (or is another
        tenant's)."""
        scoped = tenant is not None
        params = _scope({"g_id": generation_id, "g_error": error, "g_now": now}, tenant)
        row = await self._s.fetch_one(("cancel_generation", scoped), _cancel(scoped), params)
        return row is not None

    async def abandon_stale(
        self, started_before: datetime, silent_since: datetime, now: datetime, error: str
    ) -> int:
        """Fail the streams whose worker is gone: no heartbeat since `silent_since`, or (rows
        of a release without heartbeats) started before `started_before`."""
        params = {
            "g_before": started_before,
            "g_silent_since": silent_since,
            "g_now": now,
            "g_error": error,
        }
        return await self._s.execute("abandon_generations", _abandon, params)
