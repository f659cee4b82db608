"""How statements reach the database.

Statements are SQLAlchemy Core, built once per *shape* with bind parameters. On PostgreSQL each
shape is compiled once and runs as plain SQL on an asyncpg connection from the worker's pool
(app/db/pool.py): SQLAlchemy's per-execution machinery costs about three times the CPU of the
query itself (650 us against 200 us per primary-key read, measured with bench/). SQLite, the
embedded development database, runs the same statements through SQLAlchemy."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.trace import SpanKind
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ClauseElement, Executable

from app.db.errors import is_retryable_first_round_trip
from app.domain.ports import Writer

Builder = Callable[[str], Executable]  # dialect name -> statement with bind parameters
Row = Sequence[Any]


@dataclass(frozen=True, slots=True)
class ExportTarget:
    """Where an export goes and in which form. PostgreSQL renders the rows itself (COPY with
    `copy_options`); other databases fetch batches that `encode(rows, first)` turns into
    bytes (`first` with no rows: whatever precedes them, e.g. a CSV header)."""

    write: Writer
    copy_options: Mapping[str, Any]
    encode: Callable[[Sequence[Row], bool], bytes]
    max_seconds: float
    batch_size: int = 1000


_PG_DIALECT: Any = postgresql.asyncpg.dialect()  # type: ignore[no-untyped-call]


@dataclass(frozen=True, slots=True)
class _Compiled:
    sql: str
    params: tuple[str, ...]
    # Values of the binds the statement itself fixed (e.g. the 1 in `version + 1`).
    fixed: dict[str, Any]
    span_name: str
    span_attributes: dict[str, str]


_TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE)\s+(\w+)", re.IGNORECASE)
_tracer = trace.get_tracer("app.db")


def _span_details(sql: str) -> tuple[str, dict[str, str]]:
    operation = sql.split(None, 1)[0].upper()
    table = _TABLE.search(sql)
    name = f"{operation} {table.group(1)}" if table else operation
    # Parameters are never recorded: the statement text only.
    return name, {"db.system": "postgresql", "db.operation": operation, "db.statement": sql}


_compiled: dict[Any, _Compiled] = {}
_built: dict[tuple[Any, str], Executable] = {}


def statement(shape: Any, build: Builder, dialect: str) -> Executable:
    key = (shape, dialect)
    found = _built.get(key)
    if found is None:
        found = _built[key] = build(dialect)
    return found


def compiled_for_postgres(shape: Any, build: Builder) -> _Compiled:
    found = _compiled.get(shape)
    if found is None:
        clause = statement(shape, build, "postgresql")
        assert isinstance(clause, ClauseElement)
        compiled: Any = clause.compile(dialect=_PG_DIALECT)
        names = tuple(compiled.positiontup or ())
        fixed = {
            name: bind.value
            for name, bind in ((n, compiled.binds[n]) for n in names)
            if (not bind.required and bind.callable is None and bind.value is not None)
            or name.startswith("param_")
        }
        name, attributes = _span_details(compiled.string)
        found = _compiled[shape] = _Compiled(compiled.string, names, fixed, name, attributes)
    return found


class Session(Protocol):
    """One connection for one unit of work. `shape` names the statement's structure (the
    same shape must always build the same statement); `params` fill its bind parameters."""

    dialect: str

    async def fetch_one(
        self, shape: Any, build: Builder, params: Mapping[str, Any]
    ) -> Row | None: ...
    async def fetch_all(
        self, shape: Any, build: Builder, params: Mapping[str, Any]
    ) -> list[Row]: ...
    async def scalar(self, shape: Any, build: Builder, params: Mapping[str, Any]) -> Any: ...
    async def execute(self, shape: Any, build: Builder, params: Mapping[str, Any]) -> int: ...
    async def export(
        self, shape: Any, build: Builder, params: Mapping[str, Any], target: ExportTarget
    ) -> int: ...


Replace = Callable[[], Awaitable[Any]]


class PostgresSession:
    dialect = "postgresql"

    def __init__(self, connection: Any, *, replace: Replace | None = None) -> None:
        self._conn = connection  # asyncpg.Connection
        # Outside a transaction the first statement is the first round trip: if the pooled
        # connection turns out dead there, nothing ran, and one retry on a fresh one is safe.
        self._replace = replace

    async def _run(self, method: str, shape: Any, build: Builder, params: Mapping[str, Any]) -> Any:
        compiled = compiled_for_postgres(shape, build)
        fixed = compiled.fixed
        args = [params[n] if n in params else fixed[n] for n in compiled.params]
        replace, self._replace = self._replace, None
        if replace is None:
            return await self._traced(method, compiled, args)
        try:
            return await self._traced(method, compiled, args)
        except Exception as error:
            if not is_retryable_first_round_trip(error):
                raise
            self._conn = await replace()
            return await self._traced(method, compiled, args)

    async def _traced(self, method: str, compiled: _Compiled, args: list[Any]) -> Any:
        run = getattr(self._conn, method)
        # Only as a child of a sampled span: probes, background jobs and unsampled requests
        # create no spans at all (and pay nothing for them).
        if not trace.get_current_span().is_recording():
            return await run(compiled.sql, *args)
        with _tracer.start_as_current_span(
            compiled.span_name, kind=SpanKind.CLIENT, attributes=compiled.span_attributes
        ):
            return await run(compiled.sql, *args)

    async def fetch_one(self, shape: Any, build: Builder, params: Mapping[str, Any]) -> Row | None:
        row: Row | None = await self._run("fetchrow", shape, build, params)
        return row

    async def fetch_all(self, shape: Any, build: Builder, params: Mapping[str, Any]) -> list[Row]:
        rows: list[Row] = await self._run("fetch", shape, build, params)
        return rows

    async def scalar(self, shape: Any, build: Builder, params: Mapping[str, Any]) -> Any:
        return await self._run("fetchval", shape, build, params)

    async def execute(self, shape: Any, build: Builder, params: Mapping[str, Any]) -> int:
        status: str = await self._run("execute", shape, build, params)  # e.g. "DELETE 3"
        return _count(status)

    async def export(
        self, shape: Any, build: Builder, params: Mapping[str, Any], target: ExportTarget
    ) -> int:
        """COPY (query) TO STDOUT straight into `target.write`: rows stream as the server
        produces them, and a slow writer slows the server down (no buffering in between).
        Must run in a transaction (SET LOCAL lifts the statement timeout for this one)."""
        compiled = compiled_for_postgres(shape, build)
        args = [params[n] if n in params else compiled.fixed[n] for n in compiled.params]
        limit_ms = int(target.max_seconds * 1000)
        await self._conn.execute(f"SET LOCAL statement_timeout = {limit_ms}")
        status: str = await self._conn.copy_from_query(
            compiled.sql,
            *args,
            output=target.write,
            timeout=target.max_seconds,
            **target.copy_options,
        )
        return _count(status)


def _count(status: str) -> int:
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class SqlAlchemySession:
    def __init__(self, connection: AsyncConnection) -> None:
        self._conn = connection
        self.dialect = connection.dialect.name

    def _stmt(self, shape: Any, build: Builder) -> Executable:
        return statement(shape, build, self.dialect)

    async def fetch_one(self, shape: Any, build: Builder, params: Mapping[str, Any]) -> Row | None:
        return (await self._conn.execute(self._stmt(shape, build), dict(params))).first()

    async def fetch_all(self, shape: Any, build: Builder, params: Mapping[str, Any]) -> list[Row]:
        return list(await self._conn.execute(self._stmt(shape, build), dict(params)))

    async def scalar(self, shape: Any, build: Builder, params: Mapping[str, Any]) -> Any:
        return (await self._conn.execute(self._stmt(shape, build), dict(params))).scalar()

    async def execute(self, shape: Any, build: Builder, params: Mapping[str, Any]) -> int:
        result = await self._conn.execute(self._stmt(shape, build), dict(params))
        return int(getattr(result, "rowcount", 0) or 0)

    async def export(
        self, shape: Any, build: Builder, params: Mapping[str, Any], target: ExportTarget
    ) -> int:
        """Rows in batches from one server-side cursor (constant memory), encoded here."""
        head = target.encode([], True)  # e.g. the CSV header, even for no rows
        if head:
            await target.write(head)
        count = 0
        result = await self._conn.stream(self._stmt(shape, build), dict(params))
        async for partition in result.partitions(target.batch_size):
            rows = list(partition)
            await target.write(target.encode(rows, False))
            count += len(rows)
        return count
