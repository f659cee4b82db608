from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.postgres import PostgresServer
from harness.servers import clean_env, run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reports_bad_configuration_clearly() -> None:
    done = run_cli("check-config", env=clean_env(DB_POOL_SIZE="many", ENVIRONMENT="production"))
    assert done.returncode == 2
    assert "invalid configuration" in done.stderr and "DB_POOL_SIZE" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_refusal_echoes_the_value_it_refused_but_never_a_secret() -> None:
    env = clean_env(
        DB_POOL_SIZE="lots",
        REDIS_URL="http://cache:s3cret-pw@redis:6379",
        LLM_API_KEY="",  # empty is unset
        CURSOR_SECRETS='["short-and-secret", 5]',
    )
    done = run_cli("check-config", env=env)
    assert done.returncode == 2
    assert "DB_POOL_SIZE: Input should be a valid integer" in done.stderr
    assert "(got 'lots')" in done.stderr, done.stderr
    assert "REDIS_URL: the scheme must be one of" in done.stderr
    assert "(got 'http://cache:***@redis:6379')" in done.stderr, done.stderr
    assert "s3cret-pw" not in done.stderr and "short-and-secret" not in done.stderr


def test_cli_check_config_hides_secrets() -> None:
    env = clean_env(
        DATABASE_URL="postgresql://app:hunter2@db/app", DATABASE_PASSWORD="other-secret"
    )
    done = run_cli("check-config", env=env)
    assert done.returncode == 0, done.stderr
    assert "hunter2" not in done.stdout and "other-secret" not in done.stdout
    assert "DATABASE_URL=postgresql+asyncpg://app:***@db/app" in done.stdout


def test_serve_refuses_settings_that_could_only_fail_at_runtime() -> None:
    """A drain longer than gunicorn's graceful window would cut every open stream silently
    and leave its generation `streaming`: `serve` refuses to start, naming both settings."""
    env = clean_env(STREAM_DRAIN_SECONDS="40", GUNICORN_GRACEFUL_TIMEOUT="30")
    done = run_cli("serve", env=env, timeout=30)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "STREAM_DRAIN_SECONDS" in done.stderr and "GUNICORN_GRACEFUL_TIMEOUT" in done.stderr
    assert "Traceback" not in done.stderr


def test_production_start_without_a_database_names_database_url() -> None:
    done = run_cli("serve", env=clean_env(ENVIRONMENT="production"), timeout=30)
    assert done.returncode == 2
    assert "DATABASE_URL" in done.stderr and "Traceback" not in done.stderr


def test_gunicorn_reads_its_settings_from_the_settings_tree() -> None:
    code = (
        "import app.gunicorn_conf as c; "
        "print(c.graceful_timeout, c.keepalive, c.forwarded_allow_ips, c.max_requests_jitter)"
    )
    env = clean_env(
        GUNICORN_GRACEFUL_TIMEOUT="41",
        GUNICORN_KEEPALIVE="7",
        FORWARDED_ALLOW_IPS="10.0.0.1",
        GUNICORN_MAX_REQUESTS="100",
        METRICS_ENABLED="false",
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.stdout.split() == ["41", "7", "10.0.0.1", "10"], done.stderr


def test_production_serves_only_authenticated_but_migrates_without_auth_settings(
    tmp_path: Path,
) -> None:
    """The refusal is about serving: `serve` (and gunicorn started by hand, and check-config)
    refuse AUTH_MODE=none in production naming the opt-in; `migrate`, which serves nothing,
    runs with the database settings alone (the chart's migration Job has no others)."""
    production = clean_env(
        ENVIRONMENT="production", DATABASE_URL="postgresql://app@127.0.0.1:1/app"
    )
    for command in (("serve",), ("check-config",)):
        done = run_cli(*command, env=production, timeout=30)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "AUTH_ALLOW_UNAUTHENTICATED=true" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    gunicorn = subprocess.run(
        [sys.executable, "-c", "import app.gunicorn_conf"],
        env=production,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert gunicorn.returncode != 0 and "AUTH_ALLOW_UNAUTHENTICATED" in gunicorn.stderr
    opt_in = {"AUTH_ALLOW_UNAUTHENTICATED": "true", "CURSOR_SECRETS": "a-cursor-key-0123456789"}
    allowed = run_cli("check-config", env={**production, **opt_in})
    assert allowed.returncode == 0, allowed.stderr
    database = tmp_path / "app.db"
    migrate = run_cli(
        "migrate",
        env=clean_env(ENVIRONMENT="development", DATABASE_URL=f"sqlite:///{database}"),
    )
    assert migrate.returncode == 0, migrate.stderr
    # In production, with no authentication settings at all: it waits for the database (which
    # is not there) instead of refusing.
    waited = run_cli("wait-for-migrations", "--timeout", "1", env=production)
    assert waited.returncode == 1, waited.stdout + waited.stderr
    assert "AUTH_MODE" not in waited.stdout + waited.stderr


@pytest.mark.postgres
@pytest.mark.slow
def test_no_url_password_reaches_check_config_or_the_logs(
    pg: PostgresServer, schema_db: str
) -> None:
    """A marker password in every URL setting (the list is derived from the settings tree);
    then check-config, and a server whose every dependency fails in a way that gets logged
    (an issuer answering 500, an unreachable LLM upstream and trace collector, a Redis that
    refuses the password): no marker in anything printed."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    import httpx

    from app.config import URL_VARIABLES
    from harness.processes import free_port
    from harness.servers import serve

    class Failing(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(500)

        def log_message(self, *args: object) -> None:
            pass

    failing = ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    Thread(target=failing.serve_forever, daemon=True).start()
    dead = free_port()
    markers = {name: f"pw{n}x7Q" for n, name in enumerate(sorted(URL_VARIABLES))}
    database = f"postgres:{markers['DATABASE_URL']}@127.0.0.1:{pg.port}/{schema_db}"
    urls = {
        "DATABASE_URL": f"postgresql://{database}",
        "MIGRATION_DATABASE_URL": f"postgresql://{database}".replace(
            markers["DATABASE_URL"], markers["MIGRATION_DATABASE_URL"]
        ),
        "REDIS_URL": f"redis://:{markers['REDIS_URL']}@127.0.0.1:6379/0",
        "LLM_BASE_URL": f"http://u:{markers['LLM_BASE_URL']}@127.0.0.1:{dead}/v1",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://u:{markers['OTEL_EXPORTER_OTLP_ENDPOINT']}@127.0.0.1:{dead}",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": (
            f"http://u:{markers['OTEL_EXPORTER_OTLP_TRACES_ENDPOINT']}@127.0.0.1:{dead}/v1/traces"
        ),
        "AUTH_ISSUER": f"http://u:{markers['AUTH_ISSUER']}@127.0.0.1:{failing.server_port}",
        "AUTH_JWKS_URL": f"http://u:{markers['AUTH_JWKS_URL']}@127.0.0.1:{failing.server_port}/jwks",
    }
    assert set(urls) == set(URL_VARIABLES), "a URL setting this test does not know"
    env = clean_env(
        **urls,
        AUTH_MODE="jwt",
        AUTH_AUDIENCE="itemstream",
        LLM_PROVIDER="openai",
        LLM_RETRIES="0",
        RATE_LIMIT_ENABLED="true",
        OTEL_TRACES_SAMPLER_ARG="1",
        OTEL_BSP_SCHEDULE_DELAY="100",
        LOG_LEVEL="DEBUG",
    )
    shown = run_cli("check-config", env=env)
    assert shown.returncode == 0, shown.stderr
    for name in URL_VARIABLES:
        assert f"{name}=" in shown.stdout
    printed = [shown.stdout + shown.stderr]
    try:
        with serve(env) as server:
            token = "eyJhbGciOiJSUzI1NiIsImtpZCI6Im5ldyJ9.eyJzdWIiOiJ4In0.c2ln"
            bearer = {"Authorization": f"Bearer {token}"}
            httpx.get(f"{server.base}/v1/items", headers=bearer)
            chat = {"model": "itemstream-mock", "messages": [{"role": "user", "content": "hi"}]}
            httpx.post(f"{server.base}/v1/chat/completions", json=chat, headers=bearer)
            time.sleep(1.5)  # the span exporter's attempt
            printed.append(server.output())
    finally:
        failing.shutdown()
    text = "\n".join(printed)
    assert "cannot verify tokens" in text or "issuer" in text, "the failures were not logged"
    leaked = [name for name, marker in markers.items() if marker in text]
    assert not leaked, f"printed the password of {leaked}"


def test_a_misspelt_variable_is_named_with_the_setting_it_resembles() -> None:
    """A typo never passes silently: outside production `serve`/`check-config` warn naming the
    closest setting; in production they refuse (ALLOW_UNKNOWN_VARIABLES=true lets it pass).
    Variables of others with the same prefixes (the OpenTelemetry SDK, Kubernetes' service
    links, proxies) are not settings and are left alone."""
    others = {
        "OTEL_TRACES_SAMPLER": "always_on",
        "DB_PORT": "tcp://10.0.0.7:5432",
        "DB_SERVICE_HOST": "10.0.0.7",
        "HTTP_PROXY": "http://proxy:3128",
    }
    typo = {"ENVIROMENT": "production", "DB_POOLSIZE": "3", **others}
    warned = run_cli("check-config", env=clean_env(**typo))
    said = warned.stdout + warned.stderr  # the log, then the settings (names, not values)
    assert warned.returncode == 0, said
    assert "ENVIROMENT is not a setting of itemstream; did you mean ENVIRONMENT?" in said
    assert "did you mean DB_POOL_SIZE?" in said
    assert not any(f"{name} is not" in said for name in others), said

    production = clean_env(
        ENVIRONMENT="production",
        DATABASE_URL="postgresql://app@127.0.0.1:1/app",
        AUTH_ALLOW_UNAUTHENTICATED="true",
        CURSOR_SECRETS="a-cursor-key-0123456789",
        AUTH_AUDIANCE="itemstream",
        **others,
    )
    refused = run_cli("check-config", env=production)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "AUTH_AUDIANCE is not a setting of itemstream; did you mean AUTH_AUDIENCE?" in (
        refused.stderr
    )
    assert "Traceback" not in refused.stderr
    passed = run_cli("check-config", env={**production, "ALLOW_UNKNOWN_VARIABLES": "true"})
    assert passed.returncode == 0, passed.stderr
    assert "AUTH_AUDIANCE is not a setting" in passed.stdout + passed.stderr  # still said
