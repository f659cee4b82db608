"""What a database failure means to a caller, independent of the driver that raised it."""

from __future__ import annotations

import asyncpg
from sqlalchemy import exc

from app.domain.errors import DatabaseUnavailable, Outcome, SchemaNotReady

__all__ = ["DatabaseUnavailable", "Outcome", "SchemaNotReady"]

# SQLSTATE classes that mean "the database is not there right now", not "your query is wrong":
# 08 connection exception, 53 insufficient resources, 57P0x shutdown/starting, 57014 cancelled
# (statement timeout), and PgBouncer's own 08P01 for "no server connection available".
# 25006 read_only_sql_transaction: a write reached a standby. After a failover, a connection
# opened to the old primary (or a pooler's server connection still routed there) is now on a
# read-only server; like any unavailable error it is discarded, never reused, and the request
# is 503 with Retry-After while the next connection finds the new primary.
_UNAVAILABLE_SQLSTATE_PREFIXES = ("08", "25006", "53", "57P0", "57014", "58")


def is_unavailable_error(error: BaseException) -> bool:
    """True when an error means the database could not be reached, not that a query failed.
    Such a connection is in an unknown state and is never reused."""
    if isinstance(error, exc.TimeoutError | ConnectionError | TimeoutError):
        return True  # pool checkout timeout, refused/reset connections, command_timeout
    if isinstance(error, asyncpg.InvalidCachedStatementError | asyncpg.OutdatedSchemaCacheError):
        # A migration changed what a prepared statement returns, inside a transaction (outside
        # one asyncpg re-prepares by itself): nothing was applied; the retry prepares afresh.
        return True
    if isinstance(error, asyncpg.InternalClientError):
        # The driver lost track of the protocol, e.g. "cannot switch to state 15; another
        # operation is in progress" when PgBouncer reports a crashed server mid-transaction.
        return True
    if isinstance(error, asyncpg.PostgresError | asyncpg.InterfaceError):
        sqlstate = getattr(error, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_UNAVAILABLE_SQLSTATE_PREFIXES):
            return True
        return isinstance(error, asyncpg.InterfaceError | asyncpg.ConnectionDoesNotExistError)
    if isinstance(error, exc.DBAPIError):
        if error.connection_invalidated:
            return True
        orig = error.orig
        sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_UNAVAILABLE_SQLSTATE_PREFIXES):
            return True
        cause = getattr(orig, "__cause__", None)
        if cause is not None and cause is not error:
            return is_unavailable_error(cause)
        return isinstance(error, exc.InterfaceError)
    return isinstance(error, OSError)


def is_missing_table(error: BaseException | None) -> bool:
    """PostgreSQL's undefined_table, or SQLite's "no such table", anywhere in the chain."""
    while error is not None:
        if getattr(error, "sqlstate", None) == "42P01" or "no such table" in str(error):
            return True
        error = error.__cause__ or getattr(error, "orig", None)
    return False


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def is_retryable_first_round_trip(error: BaseException) -> bool:
    """A failure on a unit of work's first round trip that a fresh connection may not have:
    the pooled one was dead. (A timeout is not: the wait has been spent.)"""
    return is_unavailable_error(error) and not isinstance(error, TimeoutError)


def is_unique_violation(error: BaseException) -> bool:
    """A unique constraint refused the write (PostgreSQL 23505, or SQLite's message)."""
    seen: object = error
    for _ in range(4):  # the driver error, SQLAlchemy's wrapper, and their causes
        if not isinstance(seen, BaseException):
            return False
        sqlstate = getattr(seen, "sqlstate", None) or getattr(seen, "pgcode", None)
        if sqlstate == "23505" or "UNIQUE constraint failed" in str(seen):
            return True
        seen = getattr(seen, "orig", None) or seen.__cause__
    return False
