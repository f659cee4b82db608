"""Settings validation: URLs, secrets and the cross-setting rules refused at start."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from app.config import Settings


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "raw",
    [
        "postgres://u:p@db:5432/app",
        "postgresql://u:p@db:5432/app",
        "postgresql+psycopg://u:p@db:5432/app",
    ],
)
def test_plain_postgres_urls_get_the_async_driver(raw: str) -> None:
    assert settings(database_url=raw).database.drivername == "postgresql+asyncpg"


def test_password_from_its_own_variable() -> None:
    s = settings(database_url="postgresql://app@db/app", database_password="s3cr:t/@x")
    assert s.database.password == "s3cr:t/@x"
    assert s.migration_database.password == "s3cr:t/@x"
    assert "s3cr" not in repr(s)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"environment": "production"}, "DATABASE_URL must name a PostgreSQL database"),
        ({"cors_allow_origins": "*", "cors_allow_credentials": True}, "cannot be combined"),
        ({"database_url": "mysql://x@y/z"}, "postgresql+asyncpg or sqlite+aiosqlite"),
        (
            {
                "database_url": "postgresql://a@db/x",
                "db_pooler": "pgbouncer",
                "environment": "production",
            },
            "MIGRATION_DATABASE_URL must point straight at PostgreSQL",
        ),
        ({"db_pooler": "pgbouncer"}, "applies to PostgreSQL only"),
        ({"db_pooler": "pgbouncer-1.18"}, "db_pooler"),
        ({"default_page_size": 500}, "DEFAULT_PAGE_SIZE"),
        ({"db_statement_timeout": 10}, "DB_STATEMENT_TIMEOUT (10) must not exceed"),
        (
            {"stream_drain_seconds": 30, "gunicorn_graceful_timeout": 30},
            "STREAM_DRAIN_SECONDS (30) must be at most GUNICORN_GRACEFUL_TIMEOUT - 5 (25)",
        ),
    ],
)
def test_unsafe_configuration_is_refused(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        settings(**values)


def test_cors_origins_from_comma_list() -> None:
    assert settings(
        cors_allow_origins="https://a.example, https://b.example"
    ).cors_allow_origins == [
        "https://a.example",
        "https://b.example",
    ]
