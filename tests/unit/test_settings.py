"""Settings validation: URLs, secrets and the cross-setting rules refused at start."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import ENV_VARS, Settings, _variables, env_variable


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
    assert settings(database_url=raw).db.app_url.drivername == "postgresql+asyncpg"


@pytest.mark.parametrize(
    ("raw", "hosts", "ports"),
    [
        # libpq's form, as Patroni's and CloudNativePG's docs write it
        ("postgresql://u@pg0:5432,pg1:5433/app", ["pg0", "pg1"], [5432, 5433]),
        ("postgres://u:p@pg0,pg1,pg2/app?sslmode=require", ["pg0", "pg1", "pg2"], [5432] * 3),
        # SQLAlchemy's form
        ("postgresql+asyncpg://u@/app?host=pg0:5432&host=pg1:5432", ["pg0", "pg1"], [5432] * 2),
    ],
)
def test_several_hosts_reach_asyncpg_as_lists(raw: str, hosts: list[str], ports: list[int]) -> None:
    from app.db.pool import connect_kwargs

    url = settings(
        database_url=raw + ("&" if "?" in raw else "?") + "target_session_attrs=read-write",
        database_password="s3cr:t",
    ).db.app_url
    kwargs = connect_kwargs(url)
    assert (kwargs["host"], kwargs["port"]) == (hosts, ports)
    assert kwargs["target_session_attrs"] == "read-write"
    assert kwargs["database"] == "app" and kwargs["password"] == "s3cr:t"


def test_password_from_its_own_variable() -> None:
    s = settings(database_url="postgresql://app@db/app", database_password="s3cr:t/@x")
    assert s.db.app_url.password == "s3cr:t/@x"
    assert s.db.migrations_url.password == "s3cr:t/@x"
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
                "auth_allow_unauthenticated": True,
            },
            "MIGRATION_DATABASE_URL must point straight at PostgreSQL",
        ),
        (
            {"auth_mode": "jwt", "auth_issuer": "https://id.example", "auth_audience": None},
            "AUTH_MODE=jwt needs AUTH_AUDIENCE",
        ),
        (
            {"auth_mode": "jwt", "auth_jwks_url": "https://id.example/k", "auth_audience": "a"},
            "AUTH_MODE=jwt needs AUTH_ISSUER",
        ),
        ({"llm_models": "gpt-4o,"}, None),
        ({"db_pooler": "pgbouncer"}, "applies to PostgreSQL only"),
        ({"db_pooler": "pgbouncer-1.18"}, "'none', 'pgbouncer' or 'pgbouncer-legacy'"),
        ({"default_page_size": 500}, "DEFAULT_PAGE_SIZE"),
        ({"db_statement_timeout": 10}, "DB_STATEMENT_TIMEOUT (10) must not exceed"),
        (
            {"stream_drain_seconds": 30, "gunicorn_graceful_timeout": 30},
            "STREAM_DRAIN_SECONDS (30) must be at most GUNICORN_GRACEFUL_TIMEOUT - 5 (25)",
        ),
    ],
)
def test_unsafe_configuration_is_refused(values: dict[str, object], message: str | None) -> None:
    if message is None:  # a control: accepted
        settings(**values)
        return
    with pytest.raises(ValidationError, match=re.escape(message)):
        settings(**values)


def test_production_serves_unauthenticated_only_when_told_to() -> None:
    production = {
        "database_url": "postgresql://a@db/x",
        "environment": "production",
        "cursor_secrets": "a-key-of-sixteen-or-more",
    }
    (refusal,) = settings(**production).serving_problems()
    assert refusal.startswith(
        "AUTH_MODE=none (no authentication: every caller has every scope) is refused in "
        "production; set AUTH_MODE=jwt, or AUTH_ALLOW_UNAUTHENTICATED=true"
    )
    assert settings(**production, auth_allow_unauthenticated=True).serving_problems() == []
    assert settings().serving_problems() == [], "development serves without tokens"
    with_tokens = settings(
        **production, auth_mode="jwt", auth_issuer="https://id.example", auth_audience="api"
    )
    assert with_tokens.serving_problems() == []
    assert with_tokens.auth.tenant_claim == "sub" and with_tokens.auth.admin_scope == "items:admin"


def test_production_serves_only_with_keys_for_its_cursors() -> None:
    production = {"environment": "production", "database_url": "postgresql://a@db/x"}
    keyless = settings(**production, auth_allow_unauthenticated=True)
    (refusal,) = keyless.serving_problems()
    assert refusal.startswith("CURSOR_SECRETS is required in production")
    assert keyless.items.cursor_keys == (b"itemstream-development-cursor-key",)
    keyed = settings(
        **production,
        auth_allow_unauthenticated=True,
        cursor_secrets="new-key-0123456789,old-key-0123456789",
    )
    assert keyed.serving_problems() == []
    assert keyed.items.cursor_keys == (b"new-key-0123456789", b"old-key-0123456789")
    assert "new-key" not in repr(keyed), "keys are secrets"
    with pytest.raises(ValidationError, match="at least 16 characters"):
        settings(cursor_secrets="short")


def test_the_served_models_are_the_generation_model_and_the_listed_ones() -> None:
    s = settings(llm_model="a", llm_models="b, a,c")
    assert s.llm.served_models == ["a", "b", "c"]
    assert settings().llm.served_models == ["itemstream-mock"]


def test_cors_origins_from_comma_list() -> None:
    assert settings(
        cors_allow_origins="https://a.example, https://b.example"
    ).server.cors.allow_origins == [
        "https://a.example",
        "https://b.example",
    ]


# --- the tree and its variables ------------------------------------------------------------


def test_every_variable_has_one_place_and_every_leaf_one_variable() -> None:
    places = list(_variables(Settings, "", ()))
    assert len(places) == len(ENV_VARS), "two fields claim the same variable"
    assert len({path for _, path in places}) == len(places)
    for name, path in ENV_VARS.items():
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", name), name
        node: object = Settings(_env_file=None)
        for part in path:
            node = getattr(node, part)  # the path names a real attribute


def test_the_environment_fills_the_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_POOL_SIZE", "7")
    monkeypatch.setenv("database_url", "postgres://app@db/app")  # names are case-insensitive
    monkeypatch.setenv("STREAM_MAX_SECONDS", "12.5")
    monkeypatch.setenv("MOCK_TOKENS", "3")
    monkeypatch.setenv("AUTH_ALGORITHMS", '["ES256"]')
    monkeypatch.setenv("CORS_ALLOW_ORIGINS", "https://a.example,https://b.example")
    monkeypatch.setenv("REDIS_URL", "")  # empty is unset
    s = Settings(_env_file=None)
    assert s.db.pool_size == 7 and s.db.url == "postgresql+asyncpg://app@db/app"
    assert s.streams.max_seconds == 12.5 and s.llm.mock.tokens == 3
    assert s.auth.algorithms == ["ES256"]
    assert s.server.cors.allow_origins == ["https://a.example", "https://b.example"]
    assert s.rate_limit.redis_url is None


def test_keywords_beat_the_environment_and_the_environment_beats_dotenv(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("DB_POOL_SIZE=3\nDB_MAX_OVERFLOW=4\nLLM_MODEL=from-dotenv\n")
    monkeypatch.setenv("DB_MAX_OVERFLOW", "6")
    s = Settings(_env_file=dotenv, llm_model="from-keyword")
    assert (s.db.pool_size, s.db.max_overflow, s.llm.model) == (3, 6, "from-keyword")
    nested = Settings(_env_file=dotenv, db={"pool_size": 9})
    assert (nested.db.pool_size, nested.db.max_overflow) == (9, 6)
    monkeypatch.setenv("CORS_ALLOW_ORIGINS", "https://a.example")
    cors: dict[str, object] = {"allow_credentials": True}
    server = Settings(_env_file=None, server={"cors": cors}).server
    assert server.cors.allow_origins == ["https://a.example"] and server.cors.allow_credentials
    assert cors == {"allow_credentials": True}, "the caller's mapping is left as it was"


def test_log_format_follows_the_environment_unless_set() -> None:
    assert settings().telemetry.log_format == "console"
    production = {"environment": "production", "database_url": "postgresql://a@b/c"}
    assert settings(**production).telemetry.log_format == "json"
    assert settings(**production, log_format="console").telemetry.log_format == "console"


def test_a_wrong_value_is_reported_by_its_variable() -> None:
    with pytest.raises(ValidationError) as caught:
        settings(db_pool_size="many", mock_tokens=0)
    named = {env_variable(error["loc"]) for error in caught.value.errors()}
    assert named == {"DB_POOL_SIZE", "MOCK_TOKENS"}


def test_variables_round_trip() -> None:
    s = settings(database_url="postgresql://a@b/c", db_pool_size=4, mock_fail_after=2)
    again = Settings(_env_file=None, **{k.lower(): v for k, v in s.variables().items()})
    assert again == s and again.variables()["DB_POOL_SIZE"] == 4
