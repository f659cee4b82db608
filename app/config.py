"""Typed configuration: one `Settings` tree, read from the environment and an optional `.env`.

The tree is grouped (`settings.db.pool_size`, `settings.streams.max_seconds`, ...); the
environment keeps flat names (`DB_POOL_SIZE`, `STREAM_MAX_SECONDS`). A field's variable is its
group's `env_prefix` plus its own name, unless it carries an explicit `Env(...)`; `ENV_VARS`,
derived once from the tree, maps every variable to its place. `Settings(db_pool_size=5)` takes
the same flat names, lower case, as keywords.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin
from urllib.parse import unquote

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from sqlalchemy.engine import URL, make_url

from app.domain.principal import DEFAULT_ADMIN_SCOPE

log = logging.getLogger(__name__)

Environment = Literal["development", "test", "production"]
# How the app reaches Postgres. `pgbouncer` needs PgBouncer >= 1.21 with
# max_prepared_statements > 0; `pgbouncer-legacy` is for older PgBouncer (e.g. 1.18).
Pooler = Literal["none", "pgbouncer", "pgbouncer-legacy"]
Algorithm = Literal["RS256", "ES256"]
LogFormat = Literal["json", "console"]

DEFAULT_SQLITE_URL = "sqlite+aiosqlite:///./itemstream.db"
# Signs cursors where CURSOR_SECRETS is unset (not in production): public, so not a secret.
DEVELOPMENT_CURSOR_SECRET = "itemstream-development-cursor-key"  # noqa: S105 - public by design
# Of gunicorn's graceful timeout, what the app keeps for its own shutdown (closing pools,
# flushing spans) after connections have drained and before gunicorn's SIGKILL.
SHUTDOWN_RESERVE_SECONDS = 5


# libpq's form for several hosts (postgresql://user@host1:5432,host2:5432/db), which
# SQLAlchemy's URL parser does not read.
_MULTI_HOST = re.compile(
    r"^(?P<scheme>[\w+.-]+://)(?P<user>[^@/?]*@)?(?P<hosts>[^/?@]*,[^/?@]*)"
    r"(?P<path>/[^?]*)?(?:\?(?P<query>.*))?$"
)


def _hosts_in_query(url: str) -> str:
    """libpq's multi-host URL in the form SQLAlchemy and its asyncpg dialect read:
    ?host=host1:5432&host=host2:5432."""
    match = _MULTI_HOST.match(url)
    if match is None:
        return url
    hosts = [
        f"host={host}" if re.search(r":\d+$", host) else f"host={host}:5432"
        for host in (part.strip() for part in match["hosts"].split(","))
        if host
    ]
    query = "&".join([*hosts, *([match["query"]] if match["query"] else [])])
    return f"{match['scheme']}{match['user'] or ''}{match['path'] or '/'}?{query}"


def normalize_database_url(raw: str) -> str:
    """Accept the plain URLs hosting providers hand out (libpq's several hosts included) and
    pick the async driver."""
    url = _hosts_in_query(raw.strip())
    for prefix in (
        "postgres://",
        "postgresql://",
        "postgresql+psycopg://",
        "postgresql+psycopg2://",
    ):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    if url.startswith("sqlite://") and not url.startswith("sqlite+aiosqlite://"):
        return "sqlite+aiosqlite://" + url[len("sqlite://") :]
    return url


REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel")
SENTINEL_PORT = 26379


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """A REDIS_URL naming Sentinels rather than Redis itself:
    `redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]`
    (the form of the `redis-sentinel-url` package and Celery's docs). The credentials are
    given to the Sentinels and to the primary they name."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_redis_url(raw: str) -> SentinelTarget | None:
    """None for a URL redis-py reads itself (redis://, rediss://, unix://); the Sentinels of a
    redis+sentinel:// URL; ValueError naming what is wrong with any other."""
    scheme, sep, rest = raw.partition("://")
    if not sep or scheme not in REDIS_SCHEMES:
        raise ValueError(f"the scheme must be one of {', '.join(REDIS_SCHEMES)}")
    if scheme != "redis+sentinel":
        return None
    userinfo, at, location = rest.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username, password = unquote(user) or None, (unquote(secret) if colon else None)
    hosts, _, path = location.partition("/")
    path = path.split("?", 1)[0]
    sentinels = [_sentinel(part) for part in (h.strip() for h in hosts.split(",")) if part]
    if not sentinels:
        raise ValueError("name at least one Sentinel: redis+sentinel://host:26379/service")
    service, _, db = path.strip("/").partition("/")
    if not service:
        raise ValueError("name the primary's service after the Sentinels: .../mymaster")
    if db and not db.isdigit():
        raise ValueError(f"the database after the service must be a number, not {db!r}")
    return SentinelTarget(tuple(sentinels), unquote(service), int(db or 0), username, password)


def _sentinel(part: str) -> tuple[str, int]:
    if part.startswith("["):  # [IPv6]:port
        host, _, tail = part[1:].partition("]")
        port = tail.removeprefix(":")
    elif part.count(":") == 1:
        host, _, port = part.partition(":")
    else:
        host, port = part, ""
    port = port or str(SENTINEL_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"a Sentinel must be host[:port], not {part!r}")
    return host, int(port)


def _redis_url(value: object) -> object:
    if isinstance(value, str):
        parse_redis_url(value.strip())
        return value.strip()
    return value


def _split_list(value: object) -> object:
    """Lists from the environment: comma-separated, or a JSON array."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


def _normalize_url(value: object) -> object:
    return normalize_database_url(value) if isinstance(value, str) else value


class UrlSetting:
    """Marks a setting whose value is a URL, which may carry credentials: wherever settings
    are shown (check-config) its password is masked (URL_VARIABLES is derived from these)."""

    __slots__ = ()


StrList = Annotated[list[str], BeforeValidator(_split_list)]
DatabaseUrl = Annotated[str, BeforeValidator(_normalize_url), UrlSetting()]
Url = Annotated[str, UrlSetting()]


class Env:
    """The environment variable of a field whose name is not its group's prefix + its own."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class Group(BaseModel):
    """A branch of the settings tree."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    env_prefix: ClassVar[str] = ""


class CorsSettings(Group):
    """CORS"""

    env_prefix = "CORS_"
    # Allowed CORS origins, comma-separated or a JSON list; no CORS headers when empty.
    allow_origins: StrList = Field(default_factory=list)
    # Allow credentials on CORS requests (refused with `*`).
    allow_credentials: bool = False

    @model_validator(mode="after")
    def _check(self) -> CorsSettings:
        if "*" in self.allow_origins and self.allow_credentials:
            raise ValueError("CORS_ALLOW_ORIGINS='*' cannot be combined with credentials")
        return self


class GunicornSettings(Group):
    """gunicorn"""

    env_prefix = "GUNICORN_"
    # gunicorn worker heartbeat (seconds): with async workers an event-loop watchdog, not a
    # request timeout.
    timeout: int = Field(60, ge=1)
    # Seconds in-flight requests (and draining streams) get after SIGTERM.
    graceful_timeout: int = Field(30, ge=1)
    # Idle keep-alive seconds: longer than the proxies' in front (ALB/nginx/Envoy: 60 s), so
    # the proxy closes idle connections first and never reuses one just closed here (502s).
    keepalive: int = Field(75, ge=0)
    # Recycle a worker after this many requests (0: off; a recycle drops open streams).
    max_requests: int = Field(0, ge=0)
    # Jitter of the recycling (unset: a tenth of GUNICORN_MAX_REQUESTS).
    max_requests_jitter: int | None = Field(None, ge=0)

    @property
    def effective_max_requests_jitter(self) -> int:
        if self.max_requests_jitter is not None:
            return self.max_requests_jitter
        return self.max_requests // 10


class HttpSettings(Group):
    """HTTP reading (enforced per connection by app.protocol; see docs/operations.md)"""

    env_prefix = "HTTP_"
    # Longest request line (method, target, version) in bytes; longer is 414 (gunicorn's
    # limit_request_line; 0: no limit).
    limit_request_line: int = Field(8190, ge=0, le=65536)
    # Most header fields in a request; more is 431 (gunicorn's limit_request_fields).
    limit_request_fields: int = Field(100, ge=1, le=32768)
    # Longest header field, name and value, in bytes; longer is 431 (gunicorn's
    # limit_request_field_size).
    limit_request_field_size: int = Field(8190, ge=256, le=1_048_576)
    # All header fields of a request together, in bytes; more is 431.
    max_header_bytes: int = Field(32768, ge=1024, le=4_194_304)
    # Seconds a client has to send a request's line and headers, from the connection (or the
    # first byte of a request on a kept-alive one); then 408 and the connection is closed.
    header_timeout: float = Field(10.0, gt=0)
    # Seconds a client has to send a request's whole body once its headers are in; then the
    # connection is closed.
    body_timeout: float = Field(30.0, gt=0)
    # Send a `Server: uvicorn` header (off: it tells an attacker what to try).
    server_header: bool = False


class ServerSettings(Group):
    """HTTP server"""

    # Bind address (0.0.0.0 in a container).
    host: str = "127.0.0.1"
    # Port of the API.
    port: int = Field(8000, ge=1, le=65535)
    # gunicorn workers; unset: one per CPU the container may use (cgroup v2/v1 quota, then
    # affinity), capped by MAX_WORKERS (8). SQLite always runs one.
    web_concurrency: int | None = Field(None, ge=1, le=64)
    # The most workers sized from the CPU (WEB_CONCURRENCY is taken as given).
    max_workers: int = Field(8, ge=1, le=64)
    # Proxies whose X-Forwarded-* headers are believed (gunicorn, uvicorn, rate limits).
    forwarded_allow_ips: str = "127.0.0.1"
    # The path prefix a proxy mounts the app under and strips (e.g. /api): links the app
    # makes (Location, the docs' OpenAPI URL) carry it; probes answer with or without it.
    root_path: str = Field("", pattern=r"^(/[^/\s]+)*$")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="request bodies above get 413")
    # Serve /docs, /redoc and /openapi.json.
    docs_enabled: bool = True
    # Requests in front of the app: only these hosts (empty: any).
    allowed_hosts: StrList = Field(default_factory=list)
    # Hardening headers on every response (nosniff, frame-ancestors, CSP).
    security_headers: bool = True
    hsts_seconds: int = Field(0, ge=0, description="Strict-Transport-Security max-age; 0: off")
    cors: CorsSettings = Field(default_factory=CorsSettings)
    gunicorn: GunicornSettings = Field(default_factory=GunicornSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)


class OtelSettings(Group):
    """OpenTelemetry"""

    env_prefix = "OTEL_"
    # The OpenTelemetry SDK reads the other OTEL_* variables itself (resource attributes,
    # headers, timeouts); these decide whether tracing is on and are validated here.
    sdk_disabled: bool = False
    # service.name of the traces.
    service_name: str = "itemstream"
    # `otlp`, `console` or `none`.
    traces_exporter: Literal["otlp", "console", "none"] = "otlp"
    # OTLP/HTTP collector, e.g. http://otel-collector:4318; tracing is off without an endpoint.
    exporter_otlp_endpoint: Url | None = None
    # The traces endpoint, when it differs from OTEL_EXPORTER_OTLP_ENDPOINT.
    exporter_otlp_traces_endpoint: Url | None = None
    # Only http/protobuf (the gRPC exporter is not fork-safe under gunicorn).
    exporter_otlp_protocol: str = "http/protobuf"
    # Protocol of the traces endpoint (http/protobuf).
    exporter_otlp_traces_protocol: str | None = None
    # Unset: parent-based with this ratio for traces that start here (a sampled incoming
    # traceparent is always followed). Set OTEL_TRACES_SAMPLER to use any SDK sampler instead.
    traces_sampler: str | None = None
    # The ratio of new traces kept by the default sampler.
    traces_sampler_arg: float = Field(0.1, ge=0, le=1)

    @property
    def tracing_enabled(self) -> bool:
        if self.sdk_disabled or self.traces_exporter == "none":
            return False
        if self.traces_exporter == "console":
            return True
        return bool(self.exporter_otlp_endpoint or self.exporter_otlp_traces_endpoint)

    @model_validator(mode="after")
    def _check(self) -> OtelSettings:
        protocol = self.exporter_otlp_traces_protocol or self.exporter_otlp_protocol
        if self.tracing_enabled and self.traces_exporter == "otlp" and protocol != "http/protobuf":
            raise ValueError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: use http/protobuf "
                "(port 4318); the gRPC exporter is not fork-safe under gunicorn"
            )
        return self


class TelemetrySettings(Group):
    """Logs, metrics and traces"""

    # DEBUG, INFO, WARNING or ERROR.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # `json` (one object per line, for log collectors) or `console` (one readable line);
    # default: json in production, console elsewhere.
    log_format: LogFormat = "console"
    # Prometheus metrics (multiprocess, exact across workers).
    metrics_enabled: bool = True
    # Serve /metrics from the gunicorn master on its own port (e.g. 9090) instead of the app
    # port, so an Ingress or Gateway in front of the app never exposes it.
    metrics_port: int | None = Field(None, ge=1, le=65535)
    otel: OtelSettings = Field(default_factory=OtelSettings)


class DatabaseSettings(Group):
    """Database"""

    env_prefix = "DB_"
    # What the app uses; may point at PgBouncer. postgres:// and postgresql:// are accepted.
    # Required in production.
    url: Annotated[DatabaseUrl, Env("DATABASE_URL")] = DEFAULT_SQLITE_URL
    # Optional: keeps the password out of the URL (e.g. from a Kubernetes Secret).
    password: Annotated[SecretStr | None, Env("DATABASE_PASSWORD")] = None
    # Migrations must bypass a transaction pooler (advisory locks, DDL); defaults to
    # DATABASE_URL only when no pooler is in between.
    migration_url: Annotated[DatabaseUrl | None, Env("MIGRATION_DATABASE_URL")] = None
    # Password for MIGRATION_DATABASE_URL (default: DATABASE_PASSWORD).
    migration_password: Annotated[SecretStr | None, Env("MIGRATION_DATABASE_PASSWORD")] = None
    # Seconds a `migrate` waits for a concurrent one to finish.
    migration_lock_timeout: Annotated[float, Env("MIGRATION_LOCK_TIMEOUT")] = Field(300.0, gt=0)
    # How long `migrate` waits for the database to accept connections (a cold volume, an
    # image pull, initdb), retrying with a log line, before it fails.
    migration_wait_seconds: Annotated[float, Env("MIGRATION_WAIT_SECONDS")] = Field(180.0, ge=0)
    # `none` (direct), `pgbouncer` (PgBouncer >= 1.21 with max_prepared_statements) or
    # `pgbouncer-legacy` (older PgBouncer).
    pooler: Pooler = "none"
    # The worker's pool of PostgreSQL connections: `own` (app/db/pool.py: waiters served in
    # arrival order, recycled by age) or `asyncpg` (asyncpg's own pool with a no-op reset; kept
    # for `make bench` to compare the two, see docs/benchmarks.md).
    pool_impl: Literal["own", "asyncpg"] = "own"
    # Connections per worker process kept open.
    pool_size: int = Field(10, ge=1, le=500)
    # Connections per worker above DB_POOL_SIZE under load.
    max_overflow: int = Field(5, ge=0, le=500)
    pool_timeout: float = Field(5.0, gt=0, description="seconds to wait for a pooled conn")
    # Pooled connections are replaced after this many seconds. Keep it below the grace
    # period of the pooler in front: PgBouncer >= 1.23 stops on SIGTERM only once its clients
    # have left, so a rolling restart of the pooler completes without a failed request.
    pool_recycle: int = Field(60, ge=-1)
    # Seconds to open a connection.
    connect_timeout: float = Field(5.0, gt=0)
    # The whole database wait of one unit of work (checkout, connect, the wait in PgBouncer's
    # queue for a server, every statement, commit); past it the request gets 503. Exports
    # have their own limit (EXPORT_MAX_SECONDS). Set PgBouncer's query_wait_timeout to it.
    request_timeout: float = Field(5.0, gt=0)
    # Seconds per statement (client-side cancel; also statement_timeout when direct); at most
    # DB_REQUEST_TIMEOUT.
    statement_timeout: float = Field(5.0, gt=0)
    # /readyz answers within this, on a connection of its own (below the probe's timeout).
    readiness_timeout: Annotated[float, Env("READINESS_TIMEOUT")] = Field(2.0, gt=0)
    retry_after_seconds: int = Field(2, ge=1, description="Retry-After sent with a 503")

    @model_validator(mode="after")
    def _check(self) -> DatabaseSettings:
        problems: list[str] = []
        for env, raw in (
            ("DATABASE_URL", self.url),
            ("MIGRATION_DATABASE_URL", self.migration_url),
        ):
            if raw is None:
                continue
            try:
                url = make_url(raw)
            except Exception:
                problems.append(f"{env} is not a valid database URL")
                continue
            if url.drivername not in ("postgresql+asyncpg", "sqlite+aiosqlite"):
                problems.append(
                    f"{env} must use postgresql+asyncpg or sqlite+aiosqlite, got {url.drivername!r}"
                )
        if self.statement_timeout > self.request_timeout:
            problems.append(
                f"DB_STATEMENT_TIMEOUT ({self.statement_timeout:g}) must not exceed "
                f"DB_REQUEST_TIMEOUT ({self.request_timeout:g})"
            )
        if not problems and self.pooler != "none" and self.is_sqlite:
            problems.append("DB_POOLER applies to PostgreSQL only; set it to 'none' for SQLite")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    @cached_property
    def app_url(self) -> URL:
        """The URL the app uses (may point at PgBouncer), with the password applied."""
        return _with_password(make_url(self.url), self.password)

    @cached_property
    def migrations_url(self) -> URL:
        """The direct URL Alembic uses; never a transaction pooler."""
        if self.migration_url is None:
            return self.app_url
        return _with_password(
            make_url(self.migration_url), self.migration_password or self.password
        )


class ItemsSettings(Group):
    """Items API"""

    # How long an Idempotency-Key is remembered.
    idempotency_ttl_seconds: int = Field(86_400, ge=60)
    # Make If-Match mandatory on writes (428 without it).
    require_if_match: bool = False
    # Largest list page.
    max_page_size: int = Field(100, ge=1, le=1000)
    # List page size when none is asked for.
    default_page_size: int = Field(20, ge=1)
    # An export holds one database connection (and a PgBouncer server connection) throughout.
    export_max_seconds: float = Field(3600.0, gt=0)
    # Offset pages reach this many rows at most (an offset costs every row it skips); past
    # it, clients follow next_cursor (400 names it).
    max_offset: int = Field(10_000, ge=100)
    # A filtered list (q, is_active, prices) first reads at most this many rows of the
    # tenant in its order; when they do not fill the page it uses the filters' indexes
    # instead, as an expensive query (below). Bounds the cheap path's cost per request.
    list_window: int = Field(1000, ge=100, le=100_000)
    # Expensive queries per worker at once (filtered lists past their window or their quick
    # attempt, lists that include deleted items, totals), each on one database core (no
    # parallel workers): more wait up to EXPENSIVE_QUERY_QUEUE_SECONDS, then 503 with
    # Retry-After. Keeps one route from taking every database connection and core.
    expensive_query_concurrency: int = Field(1, ge=1, le=64)
    # How long an expensive query may wait for its turn before the 503.
    expensive_query_queue_seconds: float = Field(0.5, ge=0)
    # The share of a worker's time it may spend waiting on expensive queries (a budget of
    # database seconds refilled at this rate): with W workers in all, expensive queries
    # keep at most W x this many database cores busy.
    expensive_query_share: float = Field(0.25, gt=0, le=1)
    # Database time one expensive query may take; past it the query is cancelled in
    # PostgreSQL and the client gets 422 (narrow the filter).
    expensive_query_timeout: float = Field(2.0, gt=0)
    # Keys that sign keyset cursors (HMAC-SHA256), comma-separated, the same in every pod: the
    # first signs, every one verifies, so a new key goes first and an old one is dropped once
    # its cursors no longer matter. Required in production (`openssl rand -hex 32`); elsewhere
    # a fixed development key.
    cursor_secrets: Annotated[list[SecretStr], BeforeValidator(_split_list)] = Field(
        default_factory=list
    )

    @model_validator(mode="after")
    def _check(self) -> ItemsSettings:
        if self.default_page_size > self.max_page_size:
            raise ValueError("DEFAULT_PAGE_SIZE must not exceed MAX_PAGE_SIZE")
        if any(len(secret.get_secret_value()) < 16 for secret in self.cursor_secrets):
            raise ValueError("CURSOR_SECRETS: each key must have at least 16 characters")
        return self

    @property
    def cursor_keys(self) -> tuple[bytes, ...]:
        secrets = [secret.get_secret_value() for secret in self.cursor_secrets]
        return tuple(secret.encode() for secret in secrets or [DEVELOPMENT_CURSOR_SECRET])


class MockProviderSettings(Group):
    """The mock provider"""

    env_prefix = "MOCK_"
    # The mock provider: tokens per answer.
    tokens: int = Field(32, ge=1, le=100_000)
    # The mock provider: seconds between tokens.
    token_delay: float = Field(0.02, ge=0)
    # The mock provider: seconds before the first token.
    first_token_delay: float = Field(0.0, ge=0)
    fail_after: int | None = Field(None, ge=0, description="simulate an upstream failure")


class LlmSettings(Group):
    """LLM provider"""

    env_prefix = "LLM_"
    # `mock` streams deterministic text offline; `openai` is any OpenAI-compatible
    # /v1/chat/completions server (vLLM, OpenAI, Ollama) at LLM_BASE_URL.
    provider: Literal["mock", "openai"] = "mock"
    base_url: Url | None = Field(None, description="e.g. http://vllm:8000/v1")
    # Bearer key of the upstream.
    api_key: SecretStr | None = None
    model: str = Field("itemstream-mock", min_length=1, description="for item generations")
    # The models clients may ask for (chat completions; /v1/models lists them), comma-separated;
    # LLM_MODEL is always one. Any other is 404 `model_not_found`: the upstream is called with
    # the operator's key.
    models: StrList = Field(default_factory=list)
    # Seconds to connect to the upstream.
    connect_timeout: float = Field(5.0, gt=0)
    # The longest silence allowed between two tokens, time to first token included.
    read_timeout: float = Field(120.0, gt=0)
    max_connections: int = Field(1000, ge=1, description="per worker")
    retries: int = Field(1, ge=0, le=5, description="before the first token only")
    mock: MockProviderSettings = Field(default_factory=MockProviderSettings)

    @model_validator(mode="after")
    def _check(self) -> LlmSettings:
        if self.provider == "openai" and not self.base_url:
            raise ValueError("LLM_BASE_URL is required when LLM_PROVIDER is 'openai'")
        return self

    @property
    def served_models(self) -> list[str]:
        """LLM_MODEL first, then the other models of LLM_MODELS, each once."""
        return list(dict.fromkeys([self.model, *self.models]))


class StreamSettings(Group):
    """Streams"""

    env_prefix = "STREAM_"
    # `: ping` comments while the model is silent.
    heartbeat_seconds: float = Field(15.0, gt=0)
    # Longest stream.
    max_seconds: float = Field(300.0, gt=0)
    # Most tokens a stream may produce.
    max_tokens: int = Field(4096, ge=1)
    max_concurrent: int = Field(1000, ge=1, description="per worker; beyond it 503")
    # On SIGTERM open streams may finish for this long, then end with an error event
    # (at most GUNICORN_GRACEFUL_TIMEOUT - 5).
    drain_seconds: float = Field(10.0, ge=0)
    # A client that takes nothing of its stream for this long (the socket's buffers full) is
    # dropped and its generation recorded `cancelled`: a slow reader holds at most those
    # buffers, never a growing queue.
    send_timeout: float = Field(30.0, gt=0)
    # How often a worker saves the text of its running streams (one statement per worker per
    # interval, whatever the number of streams) and how often a resumed stream
    # (`GET /v1/generations/{id}/events`) looks for more: a resumed stream lags the live one by
    # up to twice this.
    checkpoint_seconds: float = Field(1.0, gt=0, le=60)
    # Longest prompt.
    max_prompt_chars: Annotated[int, Env("MAX_PROMPT_CHARS")] = Field(32_000, ge=1)


class AuthSettings(Group):
    """Access control"""

    env_prefix = "AUTH_"
    # `none`: no authentication, one tenant (development; loud warning; refused in production
    # unless AUTH_ALLOW_UNAUTHENTICATED). `jwt`: bearer tokens from AUTH_ISSUER (OIDC
    # discovery, or AUTH_JWKS_URL) for AUTH_AUDIENCE. `hs256`: a shared secret, development
    # only (refused in production).
    mode: Literal["none", "jwt", "hs256"] = "none"
    # OIDC issuer (discovery finds the JWKS); tokens' iss must match. Required with jwt.
    issuer: Url | None = None
    # Expected aud claim; a token for another audience is refused. Required with jwt.
    audience: str | None = None
    # The claim naming the caller's tenant: principals of one tenant share its items and
    # generations and never see another's (`sub`: every subject is its own tenant; for
    # organisations e.g. `org_id`, `tid` or a custom claim). A token without it is refused.
    tenant_claim: str = Field("sub", min_length=1)
    # The scope that reaches every tenant's items and generations (operators), on top of the
    # scope each operation needs; its use is recorded in the access log.
    admin_scope: str = Field(DEFAULT_ADMIN_SCOPE, min_length=1)
    # Serve without authentication in production (AUTH_MODE=none): every caller anonymous
    # with every scope. Only behind a gateway that authenticates for it.
    allow_unauthenticated: bool = False
    # JWKS URL, for issuers without discovery.
    jwks_url: Url | None = None
    # Accepted signature algorithms.
    algorithms: Annotated[list[Algorithm], BeforeValidator(_split_list)] = Field(
        default_factory=lambda: list[Algorithm](["RS256", "ES256"])
    )
    # The shared secret of AUTH_MODE=hs256 (development only).
    hs256_secret: SecretStr | None = None
    # Clock skew allowed on exp/nbf.
    leeway_seconds: float = Field(30.0, ge=0, le=300)
    # Requests without a token may read (items:read).
    anonymous_read: bool = False
    # How long fetched keys are kept.
    jwks_cache_seconds: float = Field(300.0, gt=0)
    # An unknown key id re-fetches the JWKS (rotation), at most this often.
    jwks_min_refresh_seconds: float = Field(10.0, ge=0)
    # Tokens that verified, kept (by their full text) until they expire or the issuer's keys
    # change, at most AUTH_JWKS_CACHE_SECONDS: a client sends the same token for its whole
    # life, and an RS256 signature check costs about 40 us of a worker's CPU. 0 turns it off.
    verified_tokens_cached: int = Field(10_000, ge=0, le=1_000_000)

    @model_validator(mode="after")
    def _check(self) -> AuthSettings:
        problems = []
        if self.mode == "jwt" and not self.issuer:
            problems.append(
                "AUTH_MODE=jwt needs AUTH_ISSUER (tokens' iss; its OIDC discovery finds the "
                "keys unless AUTH_JWKS_URL is set)"
            )
        if self.mode == "jwt" and not self.audience:
            problems.append(
                "AUTH_MODE=jwt needs AUTH_AUDIENCE: without it a token the issuer minted for "
                "any other service would be accepted"
            )
        if self.mode == "hs256":
            secret = self.hs256_secret.get_secret_value() if self.hs256_secret else ""
            if len(secret) < 32:
                problems.append("AUTH_HS256_SECRET must be at least 32 characters")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class RateLimitSettings(Group):
    """Rate limits"""

    env_prefix = "RATE_LIMIT_"
    # Per caller (token subject, or client address when anonymous; forwarded addresses are
    # believed only from FORWARDED_ALLOW_IPS). Shared through Redis when REDIS_URL is set,
    # else per worker process.
    enabled: bool = False
    # Redis for rate limits shared by all workers and pods.
    # `redis+sentinel://host:26379,host2:26379/service[/db]` names Sentinels instead: the
    # primary they report is used, and followed across a failover.
    redis_url: Annotated[Url | None, BeforeValidator(_redis_url), Env("REDIS_URL")] = None
    # Requests per caller per window.
    requests: int = Field(600, ge=1)
    # The request window.
    window_seconds: int = Field(60, ge=1)
    tokens: int = Field(200_000, ge=1, description="generated tokens per window")
    # The window of RATE_LIMIT_TOKENS.
    tokens_window_seconds: int = Field(3600, ge=1)
    streams: int = Field(20, ge=1, description="concurrent streams per caller")
    # When Redis is unreachable: `open` (serve, count, log) or `closed` (503).
    fail_mode: Literal["open", "closed"] = "open"
    # The longest wait for Redis, per call (connect included); past it the fail mode applies.
    redis_timeout: float = Field(0.05, gt=0, le=5)
    # After three Redis failures in a row, the seconds the limiter stops asking it (circuit
    # breaker): a Redis that hangs costs three RATE_LIMIT_REDIS_TIMEOUTs per period, not one
    # per request.
    breaker_seconds: float = Field(5.0, gt=0)
    # Refused tokens and scopes (401/403) per client address per RATE_LIMIT_WINDOW_SECONDS;
    # beyond it, 429.
    auth_failures: int = Field(30, ge=1)


class Settings(BaseSettings):
    """General"""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        env_ignore_empty=True,
        extra="ignore",
        frozen=True,
    )

    # `production` refuses SQLite, a wildcard CORS origin, a pooled DATABASE_URL without
    # MIGRATION_DATABASE_URL and the HS256 dev tokens; `serve` migrates first outside production.
    environment: Environment = "development"
    # A variable that looks like a setting but is none (a typo: ENVIROMENT, DB_POOLSIZE) is
    # refused in production and warned about elsewhere; true: only warn, also in production.
    allow_unknown_variables: bool = False
    server: ServerSettings = Field(default_factory=ServerSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    db: DatabaseSettings = Field(default_factory=DatabaseSettings)
    items: ItemsSettings = Field(default_factory=ItemsSettings)
    llm: LlmSettings = Field(default_factory=LlmSettings)
    streams: StreamSettings = Field(default_factory=StreamSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    rate_limit: RateLimitSettings = Field(default_factory=RateLimitSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        assert isinstance(env_settings, EnvSettingsSource)
        assert isinstance(dotenv_settings, EnvSettingsSource)
        return (
            init_settings,
            _FlatVariables(settings_cls, env_settings.env_vars),
            _FlatVariables(settings_cls, dotenv_settings.env_vars),
        )

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, data: Any) -> Any:
        """Flat variable names (`db_pool_size`) to their place in the tree (`db.pool_size`);
        a value given in the tree itself wins."""
        if not isinstance(data, Mapping):
            return data
        tree: dict[str, Any] = {}
        flat: list[tuple[tuple[str, ...], Any]] = []
        for key, value in data.items():
            path = ENV_VARS.get(key.upper()) if isinstance(key, str) else None
            if path is None:
                tree[key] = _as_dict(value)
            else:
                flat.append((path, value))
        for path, value in flat:
            node = tree
            for part in path[:-1]:
                node = node.setdefault(part, {})
                if isinstance(node, BaseModel):  # a group given as a model: it is complete
                    break
            else:
                node.setdefault(path[-1], value)
        telemetry = tree.setdefault("telemetry", {})
        if isinstance(telemetry, dict) and telemetry.get("log_format") is None:
            production = tree.get("environment") == "production"
            telemetry["log_format"] = "json" if production else "console"
        return tree

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        problems: list[str] = []
        drain_window = self.server.gunicorn.graceful_timeout - SHUTDOWN_RESERVE_SECONDS
        if self.streams.drain_seconds > drain_window:
            problems.append(
                f"STREAM_DRAIN_SECONDS ({self.streams.drain_seconds:g}) must be at most "
                f"GUNICORN_GRACEFUL_TIMEOUT - {SHUTDOWN_RESERVE_SECONDS} ({drain_window}): "
                "longer, and the server cuts open streams without their final event"
            )
        if (
            self.telemetry.metrics_port is not None
            and self.telemetry.metrics_port == self.server.port
        ):
            problems.append("METRICS_PORT must differ from PORT")
        if self.environment == "production":
            if self.db.is_sqlite:
                problems.append(
                    "DATABASE_URL must name a PostgreSQL database in production (the "
                    "embedded SQLite database is for development only)"
                )
            if "*" in self.server.cors.allow_origins:
                problems.append("CORS_ALLOW_ORIGINS='*' is refused in production")
            if self.auth.mode == "hs256":
                problems.append("AUTH_MODE=hs256 (a shared secret) is refused in production")

        if not problems:
            problems += self._pooler_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def serving_problems(self) -> list[str]:
        """What makes this configuration unfit to serve requests, though fit for the other
        commands (`migrate` serves nothing, so it needs neither authentication settings nor
        the keys that sign cursors)."""
        if self.environment != "production":
            return []
        problems = []
        if self.auth.mode == "none" and not self.auth.allow_unauthenticated:
            problems.append(
                "AUTH_MODE=none (no authentication: every caller has every scope) is refused "
                "in production; set AUTH_MODE=jwt, or AUTH_ALLOW_UNAUTHENTICATED=true if a "
                "gateway in front authenticates every request"
            )
        if not self.items.cursor_secrets:
            problems.append(
                "CURSOR_SECRETS is required in production: a random key shared by every pod "
                "(e.g. `openssl rand -hex 32`), which signs the keyset cursors clients send back"
            )
        return problems

    def unknown_variables(self, environ: Mapping[str, str]) -> tuple[list[str], list[str]]:
        """Variables of `environ` that look like settings but are none: (problems that
        refuse to serve, warnings)."""
        found = [
            f"{name} is not a setting of itemstream{_closest(name.upper())}"
            for name in sorted(environ)
            if looks_like_a_setting(name.upper())
        ]
        if self.environment == "production" and not self.allow_unknown_variables:
            return [
                f"{line} (refused in production; ALLOW_UNKNOWN_VARIABLES=true lets it pass)"
                for line in found
            ], []
        return [], found

    def _pooler_problems(self) -> list[str]:
        if self.db.pooler == "none" or self.db.migration_url is not None:
            return []
        message = (
            "MIGRATION_DATABASE_URL must point straight at PostgreSQL when DB_POOLER is "
            f"{self.db.pooler!r}: a transaction pooler breaks the migration advisory lock"
        )
        if self.environment == "production":
            return [message]
        log.warning("%s (falling back to DATABASE_URL outside production)", message)
        return []

    def variables(self) -> dict[str, Any]:
        """Every setting by its environment variable, as the app sees it."""
        values: dict[str, Any] = {}
        for name, path in ENV_VARS.items():
            node: Any = self
            for part in path:
                node = getattr(node, part)
            values[name] = node
        return values


def env_variable(loc: tuple[int | str, ...]) -> str | None:
    """The environment variable behind a validation error's location in the tree, if any (a
    rule across settings is located at their branch)."""
    path = tuple(str(part) for part in loc)
    return next((name for name, where in ENV_VARS.items() if where == path), None)


class _FlatVariables(PydanticBaseSettingsSource):
    """The variables of the tree found in one source (the environment or `.env`), flat."""

    def __init__(self, settings_cls: type[BaseSettings], found: Mapping[str, str | None]) -> None:
        super().__init__(settings_cls)
        self._found = found

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the tree's variables directly

    def __call__(self) -> dict[str, Any]:
        values = {}
        for name in ENV_VARS:
            value = self._found.get(name.lower())
            if value is not None and value != "":
                values[name.lower()] = value
        return values


def _as_dict(value: Any) -> Any:
    """A copy of a branch given as a mapping, to fill in without touching the caller's."""
    if isinstance(value, Mapping):
        return {key: _as_dict(inner) for key, inner in value.items()}
    return value


def _variables(
    model: type[BaseModel], prefix: str, path: tuple[str, ...]
) -> Iterator[tuple[str, tuple[str, ...]]]:
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, Group):
            yield from _variables(kind, kind.env_prefix, (*path, name))
            continue
        explicit = next((m.name for m in field.metadata if isinstance(m, Env)), None)
        yield explicit or (prefix + name).upper(), (*path, name)


# Every environment variable the app reads -> its place in the tree.
ENV_VARS: dict[str, tuple[str, ...]] = dict(_variables(Settings, "", ()))


def _marked_url(annotation: object, metadata: list[object]) -> bool:
    if any(isinstance(m, UrlSetting) for m in metadata):
        return True
    if get_origin(annotation) is Annotated:
        inner, *extra = get_args(annotation)
        return _marked_url(inner, extra)
    return any(_marked_url(arg, []) for arg in get_args(annotation))


def _leaf(path: tuple[str, ...]) -> Any:
    model: type[BaseModel] = Settings
    for part in path[:-1]:
        annotation = model.model_fields[part].annotation
        assert isinstance(annotation, type)
        model = annotation
    return model.model_fields[path[-1]]


def _url_variables() -> frozenset[str]:
    found = set()
    for name, path in ENV_VARS.items():
        field = _leaf(path)
        if _marked_url(field.annotation, list(field.metadata)):
            found.add(name)
    return frozenset(found)


def _secret_variables() -> frozenset[str]:
    return frozenset(
        name for name, path in ENV_VARS.items() if "SecretStr" in str(_leaf(path).annotation)
    )


# The variables whose values are URLs (credentials masked wherever settings are shown).
URL_VARIABLES = _url_variables()
# The variables whose values are never shown, not even when they are wrong.
SECRET_VARIABLES = _secret_variables()

# Variables that share a prefix with the tree's but belong to others: the OpenTelemetry SDK
# (OTEL_*), proxies, gunicorn, and Kubernetes' service links (a Service named `db` gives every
# pod DB_SERVICE_HOST, DB_PORT, DB_PORT_5432_TCP_ADDR, ...).
FOREIGN_VARIABLES = re.compile(
    r"^(OTEL_|HTTPS?_PROXY$|NO_PROXY$|GUNICORN_CMD_ARGS$)"
    r"|_SERVICE_(HOST|PORT)|_PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?$"
)
_PREFIXES = tuple(
    sorted({kind.env_prefix for kind in Group.__subclasses__() if kind.env_prefix} - {"OTEL_"})
)


def looks_like_a_setting(name: str) -> bool:
    if name in ENV_VARS or FOREIGN_VARIABLES.search(name):
        return False
    return name.startswith(_PREFIXES) or bool(
        difflib.get_close_matches(name, ENV_VARS, n=1, cutoff=0.85)
    )


def _closest(name: str) -> str:
    close = difflib.get_close_matches(name, ENV_VARS, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _with_password(url: URL, password: SecretStr | None) -> URL:
    return url if password is None else url.set(password=password.get_secret_value())
