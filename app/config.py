"""Typed configuration: one `Settings`, read from the environment and an optional `.env`."""

from __future__ import annotations

import json
import logging
from functools import cached_property
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import URL, make_url

log = logging.getLogger(__name__)

Environment = Literal["development", "test", "production"]
# How the app reaches Postgres. `pgbouncer` needs PgBouncer >= 1.21 with
# max_prepared_statements > 0; `pgbouncer-legacy` is for older PgBouncer (e.g. 1.18).
Pooler = Literal["none", "pgbouncer", "pgbouncer-legacy"]
Algorithm = Literal["RS256", "ES256"]

DEFAULT_SQLITE_URL = "sqlite+aiosqlite:///./itemstream.db"
# Of gunicorn's graceful timeout, what the app keeps for its own shutdown (closing pools,
# flushing spans) after connections have drained and before gunicorn's SIGKILL.
SHUTDOWN_RESERVE_SECONDS = 5


def normalize_database_url(raw: str) -> str:
    """Accept the plain URLs hosting providers hand out and pick the async driver."""
    url = raw.strip()
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


class Settings(BaseSettings):
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
    # DEBUG, INFO, WARNING or ERROR.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # `json` (one object per line, for log collectors) or `console` (one readable line);
    # default: json in production, console elsewhere.
    log_format: Literal["json", "console"] | None = None

    # --- HTTP server -----------------------------------------------------------------
    # Bind address (0.0.0.0 in a container).
    host: str = "127.0.0.1"
    # Port of the API.
    port: int = Field(8000, ge=1, le=65535)
    # gunicorn workers; unset: one per CPU the container may use (cgroup v2/v1 quota, then
    # affinity), capped by MAX_WORKERS (8). SQLite always runs one.
    web_concurrency: int | None = Field(None, ge=1, le=64)
    # The most workers sized from the CPU (WEB_CONCURRENCY is taken as given).
    max_workers: int = Field(8, ge=1, le=64)
    # gunicorn worker heartbeat (seconds): with async workers an event-loop watchdog, not a
    # request timeout.
    gunicorn_timeout: int = Field(60, ge=1)
    # Seconds in-flight requests (and draining streams) get after SIGTERM.
    gunicorn_graceful_timeout: int = Field(30, ge=1)
    # Idle keep-alive seconds: longer than the proxies' in front (ALB/nginx/Envoy: 60 s), so
    # the proxy closes idle connections first and never reuses one just closed here (502s).
    gunicorn_keepalive: int = Field(75, ge=0)
    # Recycle a worker after this many requests (0: off; a recycle drops open streams).
    gunicorn_max_requests: int = Field(0, ge=0)
    # Jitter of the recycling (unset: a tenth of GUNICORN_MAX_REQUESTS).
    gunicorn_max_requests_jitter: int | None = Field(None, ge=0)
    # Proxies whose X-Forwarded-* headers are believed (gunicorn, uvicorn, rate limits).
    forwarded_allow_ips: str = "127.0.0.1"
    max_body_bytes: int = Field(1_048_576, ge=1024, description="request bodies above get 413")
    # Allowed CORS origins, comma-separated or a JSON list; no CORS headers when empty.
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Allow credentials on CORS requests (refused with `*`).
    cors_allow_credentials: bool = False
    # Serve /docs, /redoc and /openapi.json.
    docs_enabled: bool = True

    # --- telemetry --------------------------------------------------------------------
    # Prometheus metrics (multiprocess, exact across workers).
    metrics_enabled: bool = True
    # Serve /metrics from the gunicorn master on its own port (e.g. 9090) instead of the app
    # port, so an Ingress or Gateway in front of the app never exposes it.
    metrics_port: int | None = Field(None, ge=1, le=65535)
    # The OpenTelemetry SDK reads the other OTEL_* variables itself (resource attributes,
    # sampler, headers, timeouts); these decide whether tracing is on and are validated here.
    otel_sdk_disabled: bool = False
    # service.name of the traces.
    otel_service_name: str = "itemstream"
    # `otlp`, `console` or `none`.
    otel_traces_exporter: Literal["otlp", "console", "none"] = "otlp"
    # OTLP/HTTP collector, e.g. http://otel-collector:4318; tracing is off without an endpoint.
    otel_exporter_otlp_endpoint: str | None = None
    # The traces endpoint, when it differs from OTEL_EXPORTER_OTLP_ENDPOINT.
    otel_exporter_otlp_traces_endpoint: str | None = None
    # Only http/protobuf (the gRPC exporter is not fork-safe under gunicorn).
    otel_exporter_otlp_protocol: str = "http/protobuf"
    # Protocol of the traces endpoint (http/protobuf).
    otel_exporter_otlp_traces_protocol: str | None = None
    # Unset: parent-based with this ratio for traces that start here (a sampled incoming
    # traceparent is always followed). Set OTEL_TRACES_SAMPLER to use any SDK sampler instead.
    otel_traces_sampler: str | None = None
    # The ratio of new traces kept by the default sampler.
    otel_traces_sampler_arg: float = Field(0.1, ge=0, le=1)

    # --- database ---------------------------------------------------------------------
    # What the app uses; may point at PgBouncer. postgres:// and postgresql:// are accepted.
    # Required in production.
    database_url: str = DEFAULT_SQLITE_URL
    # Optional: keeps the password out of the URL (e.g. from a Kubernetes Secret).
    database_password: SecretStr | None = None
    # Migrations must bypass a transaction pooler (advisory locks, DDL); defaults to
    # database_url only when no pooler is in between.
    migration_database_url: str | None = None
    # Password for MIGRATION_DATABASE_URL (default: DATABASE_PASSWORD).
    migration_database_password: SecretStr | None = None
    # Seconds a `migrate` waits for a concurrent one to finish.
    migration_lock_timeout: float = Field(300.0, gt=0)
    # How long `migrate` waits for the database to accept connections (a cold volume, an
    # image pull, initdb), retrying with a log line, before it fails.
    migration_wait_seconds: float = Field(180.0, ge=0)
    # `none` (direct), `pgbouncer` (PgBouncer >= 1.21 with max_prepared_statements) or
    # `pgbouncer-legacy` (older PgBouncer).
    db_pooler: Pooler = "none"
    # Connections per worker process kept open.
    db_pool_size: int = Field(10, ge=1, le=500)
    # Connections per worker above DB_POOL_SIZE under load.
    db_max_overflow: int = Field(5, ge=0, le=500)
    db_pool_timeout: float = Field(5.0, gt=0, description="seconds to wait for a pooled conn")
    # Pooled connections are replaced after this many seconds. Keep it below the grace
    # period of the pooler in front: PgBouncer >= 1.23 stops on SIGTERM only once its clients
    # have left, so a rolling restart of the pooler completes without a failed request.
    db_pool_recycle: int = Field(60, ge=-1)
    # Seconds to open a connection.
    db_connect_timeout: float = Field(5.0, gt=0)
    # The whole database wait of one unit of work (checkout, connect, the wait in PgBouncer's
    # queue for a server, every statement, commit); past it the request gets 503. Exports
    # have their own limit (EXPORT_MAX_SECONDS). Set PgBouncer's query_wait_timeout to it.
    db_request_timeout: float = Field(5.0, gt=0)
    # Seconds per statement (client-side cancel; also statement_timeout when direct); at most
    # DB_REQUEST_TIMEOUT.
    db_statement_timeout: float = Field(5.0, gt=0)
    # /readyz answers within this, on a connection of its own (below the probe's timeout).
    readiness_timeout: float = Field(2.0, gt=0)
    db_retry_after_seconds: int = Field(2, ge=1, description="Retry-After sent with a 503")

    # --- items API --------------------------------------------------------------------
    # How long an Idempotency-Key is remembered.
    idempotency_ttl_seconds: int = Field(86_400, ge=60)
    # Make If-Match mandatory on writes (428 without it).
    require_if_match: bool = False
    # Largest list page.
    max_page_size: int = Field(100, ge=1, le=1000)
    # List page size when none is asked for.
    default_page_size: int = Field(20, ge=1)

    # --- LLM provider and streams ------------------------------------------------------
    # `mock` streams deterministic text offline; `openai` is any OpenAI-compatible
    # /v1/chat/completions server (vLLM, OpenAI, Ollama) at LLM_BASE_URL.
    llm_provider: Literal["mock", "openai"] = "mock"
    llm_base_url: str | None = Field(None, description="e.g. http://vllm:8000/v1")
    # Bearer key of the upstream.
    llm_api_key: SecretStr | None = None
    llm_model: str = Field("itemstream-mock", min_length=1, description="for item generations")
    # Seconds to connect to the upstream.
    llm_connect_timeout: float = Field(5.0, gt=0)
    # The longest silence allowed between two tokens, time to first token included.
    llm_read_timeout: float = Field(120.0, gt=0)
    llm_max_connections: int = Field(1000, ge=1, description="per worker")
    llm_retries: int = Field(1, ge=0, le=5, description="before the first token only")
    # The mock provider: tokens per answer.
    mock_tokens: int = Field(32, ge=1, le=100_000)
    # The mock provider: seconds between tokens.
    mock_token_delay: float = Field(0.02, ge=0)
    # The mock provider: seconds before the first token.
    mock_first_token_delay: float = Field(0.0, ge=0)
    mock_fail_after: int | None = Field(None, ge=0, description="simulate an upstream failure")
    # `: ping` comments while the model is silent.
    stream_heartbeat_seconds: float = Field(15.0, gt=0)
    # Longest stream.
    stream_max_seconds: float = Field(300.0, gt=0)
    # Most tokens a stream may produce.
    stream_max_tokens: int = Field(4096, ge=1)
    stream_max_concurrent: int = Field(1000, ge=1, description="per worker; beyond it 503")
    # On SIGTERM open streams may finish for this long, then end with an error event
    # (at most GUNICORN_GRACEFUL_TIMEOUT - 5).
    stream_drain_seconds: float = Field(10.0, ge=0)
    # A client that takes nothing of its stream for this long (the socket's buffers full) is
    # dropped and its generation recorded `cancelled`: a slow reader holds at most those
    # buffers, never a growing queue.
    stream_send_timeout: float = Field(30.0, gt=0)
    # How often a worker saves the text of its running streams (one statement per worker per
    # interval, whatever the number of streams) and how often a resumed stream
    # (`GET /v1/generations/{id}/events`) looks for more: a resumed stream lags the live one by
    # up to twice this.
    stream_checkpoint_seconds: float = Field(1.0, gt=0, le=60)
    # Longest prompt.
    max_prompt_chars: int = Field(32_000, ge=1)
    # An export holds one database connection (and a PgBouncer server connection) throughout.
    export_max_seconds: float = Field(3600.0, gt=0)

    # --- access control -----------------------------------------------------------------
    # `none`: no authentication (development; loud warning). `jwt`: bearer tokens from
    # AUTH_ISSUER (OIDC discovery) or AUTH_JWKS_URL. `hs256`: a shared secret, development
    # only (refused in production).
    auth_mode: Literal["none", "jwt", "hs256"] = "none"
    # OIDC issuer (discovery finds the JWKS); tokens' iss must match.
    auth_issuer: str | None = None
    # Expected aud claim.
    auth_audience: str | None = None
    # JWKS URL, for issuers without discovery.
    auth_jwks_url: str | None = None
    # Accepted signature algorithms.
    auth_algorithms: Annotated[list[Algorithm], NoDecode] = Field(
        default_factory=lambda: list[Algorithm](["RS256", "ES256"])
    )
    # The shared secret of AUTH_MODE=hs256 (development only).
    auth_hs256_secret: SecretStr | None = None
    # Clock skew allowed on exp/nbf.
    auth_leeway_seconds: float = Field(30.0, ge=0, le=300)
    # Requests without a token may read (items:read).
    auth_anonymous_read: bool = False
    # How long fetched keys are kept.
    auth_jwks_cache_seconds: float = Field(300.0, gt=0)
    # An unknown key id re-fetches the JWKS (rotation), at most this often.
    auth_jwks_min_refresh_seconds: float = Field(10.0, ge=0)
    # Requests in front of the app: only these hosts (empty: any).
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Hardening headers on every response (nosniff, frame-ancestors, CSP).
    security_headers: bool = True
    hsts_seconds: int = Field(0, ge=0, description="Strict-Transport-Security max-age; 0: off")

    # --- rate limits -----------------------------------------------------------------------
    # Per caller (token subject, or client address when anonymous; forwarded addresses are
    # believed only from FORWARDED_ALLOW_IPS). Shared through Redis when REDIS_URL is set,
    # else per worker process.
    rate_limit_enabled: bool = False
    # Redis for rate limits shared by all workers and pods.
    redis_url: str | None = None
    # Requests per caller per window.
    rate_limit_requests: int = Field(600, ge=1)
    # The request window.
    rate_limit_window_seconds: int = Field(60, ge=1)
    rate_limit_tokens: int = Field(200_000, ge=1, description="generated tokens per window")
    # The window of RATE_LIMIT_TOKENS.
    rate_limit_tokens_window_seconds: int = Field(3600, ge=1)
    rate_limit_streams: int = Field(20, ge=1, description="concurrent streams per caller")
    # When Redis is unreachable: `open` (serve, count, log) or `closed` (503).
    rate_limit_fail_mode: Literal["open", "closed"] = "open"

    @field_validator("cors_allow_origins", "auth_algorithms", "allowed_hosts", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        """Lists from the environment: comma-separated, or a JSON array."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [item.strip() for item in text.split(",") if item.strip()]
        return value

    @field_validator("database_url", "migration_database_url", mode="before")
    @classmethod
    def _normalize_url(cls, value: object) -> object:
        return normalize_database_url(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        problems = self._url_problems()
        if self.db_statement_timeout > self.db_request_timeout:
            problems.append(
                f"DB_STATEMENT_TIMEOUT ({self.db_statement_timeout:g}) must not exceed "
                f"DB_REQUEST_TIMEOUT ({self.db_request_timeout:g})"
            )
        drain_window = self.gunicorn_graceful_timeout - SHUTDOWN_RESERVE_SECONDS
        if self.stream_drain_seconds > drain_window:
            problems.append(
                f"STREAM_DRAIN_SECONDS ({self.stream_drain_seconds:g}) must be at most "
                f"GUNICORN_GRACEFUL_TIMEOUT - {SHUTDOWN_RESERVE_SECONDS} ({drain_window}): "
                "longer, and the server cuts open streams without their final event"
            )
        if self.default_page_size > self.max_page_size:
            problems.append("DEFAULT_PAGE_SIZE must not exceed MAX_PAGE_SIZE")
        if "*" in self.cors_allow_origins and self.cors_allow_credentials:
            problems.append("CORS_ALLOW_ORIGINS='*' cannot be combined with credentials")
        if not problems:
            problems += self._pooler_problems()
        protocol = self.otel_exporter_otlp_traces_protocol or self.otel_exporter_otlp_protocol
        if (
            self.tracing_enabled
            and self.otel_traces_exporter == "otlp"
            and protocol != "http/protobuf"
        ):
            problems.append(
                f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: use http/protobuf "
                "(port 4318); the gRPC exporter is not fork-safe under gunicorn"
            )
        problems += self._auth_problems()
        if self.llm_provider == "openai" and not self.llm_base_url:
            problems.append("LLM_BASE_URL is required when LLM_PROVIDER is 'openai'")
        if self.metrics_port is not None and self.metrics_port == self.port:
            problems.append("METRICS_PORT must differ from PORT")
        if self.environment == "production":
            if self.is_sqlite:
                problems.append(
                    "DATABASE_URL must name a PostgreSQL database in production (the "
                    "embedded SQLite database is for development only)"
                )
            if "*" in self.cors_allow_origins:
                problems.append("CORS_ALLOW_ORIGINS='*' is refused in production")
        if problems:
            raise ValueError("invalid configuration: " + "; ".join(problems))
        return self

    def _url_problems(self) -> list[str]:
        problems: list[str] = []
        for name in ("database_url", "migration_database_url"):
            raw = getattr(self, name)
            if raw is None:
                continue
            try:
                url = make_url(raw)
            except Exception:
                problems.append(f"{name.upper()} is not a valid database URL")
                continue
            if url.drivername not in ("postgresql+asyncpg", "sqlite+aiosqlite"):
                problems.append(
                    f"{name.upper()} must use postgresql+asyncpg or sqlite+aiosqlite, "
                    f"got {url.drivername!r}"
                )
        return problems

    def _auth_problems(self) -> list[str]:
        problems = []
        if self.auth_mode == "jwt" and not (self.auth_issuer or self.auth_jwks_url):
            problems.append("AUTH_MODE=jwt needs AUTH_ISSUER (OIDC discovery) or AUTH_JWKS_URL")
        if self.auth_mode == "hs256":
            if self.environment == "production":
                problems.append("AUTH_MODE=hs256 (a shared secret) is refused in production")
            secret = self.auth_hs256_secret.get_secret_value() if self.auth_hs256_secret else ""
            if len(secret) < 32:
                problems.append("AUTH_HS256_SECRET must be at least 32 characters")
        return problems

    def _pooler_problems(self) -> list[str]:
        if self.db_pooler == "none":
            return []
        if self.is_sqlite:
            return ["DB_POOLER applies to PostgreSQL only; set it to 'none' for SQLite"]
        if self.migration_database_url is None:
            message = (
                "MIGRATION_DATABASE_URL must point straight at PostgreSQL when DB_POOLER is "
                f"{self.db_pooler!r}: a transaction pooler breaks the migration advisory lock"
            )
            if self.environment == "production":
                return [message]
            log.warning("%s (falling back to DATABASE_URL outside production)", message)
        return []

    @cached_property
    def database(self) -> URL:
        """The URL the app uses (may point at PgBouncer), with the password applied."""
        return _with_password(make_url(self.database_url), self.database_password)

    @cached_property
    def migration_database(self) -> URL:
        """The direct URL Alembic uses; never a transaction pooler."""
        if self.migration_database_url is None:
            return self.database
        password = self.migration_database_password or self.database_password
        return _with_password(make_url(self.migration_database_url), password)

    @property
    def effective_log_format(self) -> Literal["json", "console"]:
        if self.log_format is not None:
            return self.log_format
        return "json" if self.environment == "production" else "console"

    @property
    def tracing_enabled(self) -> bool:
        if self.otel_sdk_disabled or self.otel_traces_exporter == "none":
            return False
        if self.otel_traces_exporter == "console":
            return True
        return bool(self.otel_exporter_otlp_endpoint or self.otel_exporter_otlp_traces_endpoint)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def _with_password(url: URL, password: SecretStr | None) -> URL:
    return url if password is None else url.set(password=password.get_secret_value())
