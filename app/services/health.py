"""Readiness: the database answers, on a connection of its own, and its schema serves this
code (at head, or ahead of it by the expand/contract rule)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from app.db.engine import Database
from app.db.migrations import database_revision, schema_status
from app.domain.errors import DatabaseUnavailable
from app.lifecycle import Lifecycle

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    detail: str


class HealthService:
    """`db` must not be the request pool: a pool saturated by long exports would make the
    probe queue behind them and take a busy pod out of service."""

    def __init__(self, db: Database, lifecycle: Lifecycle) -> None:
        self._db = db
        self._lifecycle = lifecycle
        self._last_detail: str | None = None

    async def readiness(self) -> Readiness:
        if self._lifecycle.shutting_down:
            return Readiness(False, "shutting down")
        try:
            current = await database_revision(self._db)
        except DatabaseUnavailable as error:
            return self._report(Readiness(False, f"database unavailable: {error}"))
        except Exception as error:
            return self._report(Readiness(False, f"schema check failed: {type(error).__name__}"))
        status = schema_status(current)
        return self._report(Readiness(status.serves_this_code, status.describe()))

    def _report(self, result: Readiness) -> Readiness:
        # Log changes only: probes come every few seconds.
        if result.detail != self._last_detail:
            self._last_detail = result.detail
            level = logging.INFO if result.ready else logging.WARNING
            log.log(level, "readiness: %s", result.detail)
        return result
