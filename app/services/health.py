"""Readiness: the database answers through the app's own pool and the schema is at head."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.sql import Executable

from app.db.engine import Database, DatabaseUnavailable
from app.lifecycle import Lifecycle


def _version_query(dialect: str) -> Executable:
    return text("SELECT version_num FROM alembic_version")


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    detail: str


class HealthService:
    def __init__(self, db: Database, expected_revision: str, lifecycle: Lifecycle) -> None:
        self._db = db
        self._expected = expected_revision
        self._lifecycle = lifecycle

    async def readiness(self) -> Readiness:
        if self._lifecycle.shutting_down:
            return Readiness(False, "shutting down")
        try:
            async with self._db.read() as session:
                current = await session.scalar("alembic_version", _version_query, {})
        except DatabaseUnavailable as error:
            return Readiness(False, f"database unavailable: {error}")
        except Exception as error:  # e.g. alembic_version missing on an empty database
            return Readiness(False, f"schema check failed: {type(error).__name__}")
        if current != self._expected:
            return Readiness(False, f"schema at {current or 'nothing'}, expected {self._expected}")
        return Readiness(True, f"schema at {current}")
