"""Run Alembic safely: a direct connection, a Postgres advisory lock so that concurrent runs
apply exactly once, and a lock-free fast path when the schema is already at head."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool
from sqlalchemy.sql import Executable

from alembic import command
from app.db.engine import Database, sqlite_engine
from app.db.errors import SchemaNotReady, is_unavailable_error, one_line

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SCRIPT_LOCATION = PROJECT_ROOT / "alembic"
# Any constant works; this one reads "itemstrm" in ASCII.
ADVISORY_LOCK_KEY = 0x6974656D7374726D & 0x7FFF_FFFF_FFFF_FFFF


class MigrationLockTimeout(RuntimeError):
    pass


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    return config


@cache
def head_revision() -> str:
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"expected one Alembic head, found {heads}")
    return heads[0]


@cache
def known_revisions() -> frozenset[str]:
    script = ScriptDirectory.from_config(alembic_config())
    return frozenset(revision.revision for revision in script.walk_revisions())


Relation = Literal["head", "ahead", "behind", "empty"]


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    """Where the database's schema stands relative to this code's migrations.

    Expand/contract: every migration keeps the previous release working, so a database
    *ahead* of this code (at a revision it does not know: a newer release migrated, or this
    is a rollback) serves this code; a database *behind* it (or empty) does not."""

    current: str | None
    head: str
    relation: Relation

    @property
    def serves_this_code(self) -> bool:
        return self.relation in ("head", "ahead")

    def describe(self) -> str:
        match self.relation:
            case "head":
                return f"schema at {self.head}"
            case "ahead":
                return (
                    f"schema at {self.current}, ahead of this release's {self.head} "
                    "(a newer release migrated; compatible by the expand/contract rule)"
                )
            case "behind":
                return (
                    f"schema at {self.current}, behind this release's {self.head}: "
                    "migration pending, run `itemstream migrate`"
                )
        return f"database has no schema; migration to {self.head} pending, run `itemstream migrate`"


def schema_status(current: str | None) -> SchemaStatus:
    head = head_revision()
    if current is None:
        return SchemaStatus(None, head, "empty")
    if current == head:
        return SchemaStatus(current, head, "head")
    return SchemaStatus(current, head, "behind" if current in known_revisions() else "ahead")


# Online schema changes (PostgreSQL): each statement alone in its transaction, so a
# migration never holds one table's lock while it waits for another's (which would deadlock
# with the app's transactions, e.g. a keyed create: idempotency key, then item); and waiting at
# most LOCK_TIMEOUT for its lock, because every query of the table queues behind a waiting
# ALTER: a long transaction (an export) makes it give up and try again, not stall the service.
LOCK_TIMEOUT_MS = 2000
LOCK_ATTEMPTS = 30


def online_ddl(*statements: str) -> None:
    """Run DDL from a migration as above; each statement must be safe to run again (`IF NOT
    EXISTS`), since a migration that failed midway is run again from its start."""
    from sqlalchemy.exc import DBAPIError

    from alembic import op

    with op.get_context().autocommit_block():
        for sql in statements:
            for attempt in range(1, LOCK_ATTEMPTS + 1):
                op.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
                try:
                    op.execute(sql)
                    break
                except DBAPIError as error:
                    sqlstate = getattr(error.orig, "sqlstate", None) or getattr(
                        getattr(error.orig, "__cause__", None), "sqlstate", None
                    )
                    if sqlstate != "55P03" or attempt == LOCK_ATTEMPTS:  # lock_not_available
                        raise
                    pause = min(0.1 * 2**attempt, 5.0) * random.uniform(0.5, 1.0)  # noqa: S311
                    log.warning(
                        "migration: no lock within %d ms for %r (attempt %d); retrying in %.1fs",
                        LOCK_TIMEOUT_MS,
                        sql.split(" ADD ")[0],
                        attempt,
                        pause,
                    )
                    time.sleep(pause)
        op.execute("RESET lock_timeout")


def _revision_statement(dialect: str) -> Executable:
    return text("SELECT version_num FROM alembic_version")


async def database_revision(db: Database) -> str | None:
    """The revision the database is at; None when it was never migrated."""
    try:
        async with db.read() as session:
            revision = await session.scalar("alembic_version", _revision_statement, {})
    except SchemaNotReady:
        return None
    return str(revision) if revision is not None else None


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def current_revision(connection: AsyncConnection) -> str | None:
    return await connection.run_sync(_current_revision)


def _upgrade(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


async def _acquire_lock(connection: AsyncConnection, wait_seconds: float) -> None:
    deadline = time.monotonic() + wait_seconds
    announced = False
    while True:
        got = await connection.scalar(
            text("SELECT pg_try_advisory_lock(:key)"), {"key": ADVISORY_LOCK_KEY}
        )
        await connection.commit()  # the session lock outlives the transaction
        if got:
            return
        if time.monotonic() > deadline:
            raise MigrationLockTimeout(
                f"another migration held the lock for more than {wait_seconds:.0f}s"
            )
        if not announced:
            log.info("another migration is running; waiting for its lock")
            announced = True
        await asyncio.sleep(0.25)


async def _connect(
    engine: AsyncEngine, wait_seconds: float, interval: float = 2.0
) -> AsyncConnection:
    """The first connection, retried while the database is not there yet (a fresh install
    starts the migration and the database together)."""
    deadline = time.monotonic() + wait_seconds
    attempt = 0
    while True:
        attempt += 1
        try:
            return await engine.connect()
        except Exception as error:
            if not is_unavailable_error(error) or time.monotonic() + interval > deadline:
                raise
            log.warning(
                "database not reachable yet (attempt %d, %s); retrying for up to %.0fs more",
                attempt,
                one_line(error),
                deadline - time.monotonic(),
            )
            await asyncio.sleep(interval)


async def migrate(
    url: URL, *, revision: str = "head", lock_timeout: float = 300.0, wait_seconds: float = 0.0
) -> bool:
    """Upgrade to `revision`, waiting up to `wait_seconds` for the database to accept
    connections. Returns True when this call applied something."""
    target = head_revision() if revision == "head" else revision
    engine = (
        sqlite_engine(url, poolclass=NullPool)
        if url.get_backend_name() == "sqlite"
        else create_async_engine(url, poolclass=NullPool)
    )
    try:
        connection = await _connect(engine, wait_seconds)
        try:
            return await _migrate_on(connection, target, revision, lock_timeout)
        finally:
            await connection.close()
    finally:
        await engine.dispose()


async def _migrate_on(
    connection: AsyncConnection, target: str, revision: str, lock_timeout: float
) -> bool:
    before = await current_revision(connection)
    await connection.commit()
    if before == target:
        log.info("schema already at %s", target)
        return False
    postgres = connection.dialect.name == "postgresql"
    if postgres:
        await _acquire_lock(connection, lock_timeout)
    try:
        before = await current_revision(connection)
        await connection.commit()
        if before == target:
            log.info("schema reached %s while waiting; nothing to do", target)
            return False
        log.info("upgrading schema from %s to %s", before or "empty", target)
        await connection.run_sync(_upgrade, revision)
        await connection.commit()
        return True
    finally:
        if postgres:
            await connection.execute(
                text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_LOCK_KEY}
            )
            await connection.commit()


async def wait_for_head(url: URL, *, wait_seconds: float, interval: float = 2.0) -> None:
    """Block until the schema serves this code: at its head, or ahead of it (a newer release
    migrated; see SchemaStatus). Used by pods that must not start before the migration."""
    engine = create_async_engine(url, poolclass=NullPool)
    deadline = time.monotonic() + wait_seconds
    last = "not checked"
    try:
        while True:
            try:
                async with engine.connect() as connection:
                    status = schema_status(await current_revision(connection))
                if status.serves_this_code:
                    log.info("%s", status.describe())
                    return
                last = status.describe()
            except Exception as error:  # the database may still be starting
                last = f"database not reachable: {type(error).__name__}: {error}"
            if time.monotonic() > deadline:
                raise TimeoutError(last)
            log.info("%s", last)
            await asyncio.sleep(interval)
    finally:
        await engine.dispose()
