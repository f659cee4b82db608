"""Run Alembic safely: a direct connection, a Postgres advisory lock so that concurrent runs
apply exactly once, and a lock-free fast path when the schema is already at head."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import NullPool

from alembic import command

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


def head_revision() -> str:
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"expected one Alembic head, found {heads}")
    return heads[0]


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


async def migrate(url: URL, *, revision: str = "head", lock_timeout: float = 300.0) -> bool:
    """Upgrade to `revision`. Returns True when this call applied something."""
    target = head_revision() if revision == "head" else revision
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
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
    finally:
        await engine.dispose()


async def wait_for_head(url: URL, *, wait_seconds: float, interval: float = 2.0) -> None:
    """Block until the schema is at head (used by pods that must not start before it)."""
    target = head_revision()
    engine = create_async_engine(url, poolclass=NullPool)
    deadline = time.monotonic() + wait_seconds
    last = "not checked"
    try:
        while True:
            try:
                async with engine.connect() as connection:
                    current = await current_revision(connection)
                if current == target:
                    log.info("schema is at head %s", target)
                    return
                last = f"schema at {current or 'empty'}, waiting for {target}"
            except Exception as error:  # the database may still be starting
                last = f"database not reachable: {type(error).__name__}: {error}"
            if time.monotonic() > deadline:
                raise TimeoutError(last)
            log.info("%s", last)
            await asyncio.sleep(interval)
    finally:
        await engine.dispose()
