"""A newcomer's first hour, run as they would: the README's commands with no uv on PATH, the
move from SQLite to PostgreSQL, the local real stack (`make stack`, compose.yaml), and the
logs they read while doing it."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jsonschema
import pytest
import yaml

from app.config import ENV_VARS, Settings
from app.db.migrations import head_revision
from app.telemetry.logs import ConsoleFormatter, JsonFormatter, logging_config
from harness.pgbouncer import MODERN, find_binary
from harness.postgres import PostgresServer, throwaway_cluster
from harness.processes import (
    free_port,
    hand_over,
    run_coroutine,
    stop,
    stop_group,
    unprivileged_user,
    wait_for_port,
    wait_until,
)
from harness.servers import clean_env, run_cli, serve
from tests.support.skips import missing

ROOT = Path(__file__).resolve().parents[1]


def _answers(url: str, path: str = "/readyz") -> bool:
    try:
        return httpx.get(f"{url}{path}", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _path_without_uv() -> str:
    """A PATH with make and python3 but no uv binary on it (nor pyenv's shims)."""
    path = "/usr/local/bin:/usr/bin:/bin"
    assert not any(Path(d, "uv").exists() for d in path.split(":")), "uv is on the system PATH"
    return path


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


@pytest.mark.slow
def test_make_run_serves_without_uv_on_path(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(
        PATH=_path_without_uv(),
        PORT=str(port),
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'first.db'}",
    )
    log = tmp_path / "make-run.log"
    proc = _start(["make", "run"], env, log)
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: _answers(base) or proc.poll() is not None, 90), log.read_text()
        assert proc.poll() is None, log.read_text()[-3000:]
        created = httpx.post(f"{base}/v1/items", json={"name": "first", "price": 1})
        assert created.status_code == 201
    finally:
        stop_group(proc)
    output = log.read_text()
    base = f"http://127.0.0.1:{port}"
    assert f"itemstream API at {base}, docs at {base}/docs" in output


def test_uv_wrapper_finds_uv_without_path() -> None:
    done = subprocess.run(
        ["./scripts/uv.sh", "--version"],
        cwd=ROOT,
        env={**os.environ, "PATH": _path_without_uv()},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("uv ")


@pytest.fixture
def fresh_database(pg: PostgresServer) -> Iterator[str]:
    name = pg.create_database("itemstream_fresh")
    try:
        yield name
    finally:
        pg.drop_database(name)


@pytest.mark.postgres
@pytest.mark.slow
def test_serve_migrates_a_fresh_postgres_outside_production(
    pg: PostgresServer, fresh_database: str
) -> None:
    url = pg.url(fresh_database).render_as_string(hide_password=False)
    with serve(clean_env(DATABASE_URL=url, ENVIRONMENT="development")) as server:
        created = httpx.post(f"{server.base}/v1/items", json={"name": "on pg", "price": 1})
        assert created.status_code == 201, created.text
        assert f"upgrading schema from empty to {head_revision()}" in server.output()


@pytest.mark.postgres
@pytest.mark.slow
def test_production_on_an_unmigrated_database_answers_503_naming_the_fix(
    pg: PostgresServer, fresh_database: str, tmp_path: Path
) -> None:
    url = pg.url(fresh_database).render_as_string(hide_password=False)
    port = free_port()
    env = clean_env(
        DATABASE_URL=url,
        ENVIRONMENT="production",
        AUTH_ALLOW_UNAUTHENTICATED="true",
        CURSOR_SECRETS="first-hour-cursor-key-0123456789",
        PORT=str(port),
    )
    log = tmp_path / "serve.log"
    proc = _start([sys.executable, "-m", "app", "serve"], {**env, "PYTHONPATH": str(ROOT)}, log)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _answers(base, "/livez"), 60), log.read_text()
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 503
        assert "migration to" in ready.json()["detail"] and "itemstream migrate" in ready.text
        for _ in range(3):
            response = httpx.get(f"{base}/v1/items")
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"]
            assert "itemstream migrate" in response.json()["detail"]
    finally:
        stop_group(proc)
    output = log.read_text()
    assert "database schema not migrated" in output
    assert "Traceback" not in output
    # Once, not once per request.
    assert output.count("database schema not migrated") <= 2  # at most once per worker


@pytest.mark.postgres
@pytest.mark.slow
def test_sigint_to_the_master_alone_stops_every_worker_quickly(
    pg: PostgresServer, schema_db: str
) -> None:
    """What `kill -INT <master>` (or a runner forwarding Ctrl-C to its child only) sends: the
    master passes SIGQUIT to its workers, which used to ignore it until the graceful timeout
    (30 s) ran out and the master SIGKILLed them ("Perhaps out of memory?")."""
    url = pg.url(schema_db).render_as_string(hide_password=False)
    with serve(clean_env(DATABASE_URL=url, WEB_CONCURRENCY="2", LOG_LEVEL="INFO")) as server:
        started = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        server.proc.wait(40)
        took = time.monotonic() - started
        output = server.output()
    assert took < 10, f"{took:.1f} s\n{output[-2000:]}"
    assert "SIGKILL" not in output and "Traceback" not in output, output[-3000:]


@pytest.mark.postgres
@pytest.mark.slow
def test_make_stack_runs_the_app_behind_pgbouncer(tmp_path: Path, pg: PostgresServer) -> None:
    if find_binary(MODERN) is None and find_binary("legacy") is None:
        missing("no PgBouncer; run `make test`")
    port = free_port()
    log = tmp_path / "stack.log"
    database = f"itemstream_stack_{os.getpid()}"
    env = {**os.environ, "PORT": str(port), "LOG_FORMAT": "console", "STACK_DATABASE": database}
    for key in [k for k in env if k.startswith(("DATABASE_", "MIGRATION_", "DB_"))]:
        del env[key]
    proc = _start(["make", "stack"], env, log)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _answers(base) or proc.poll() is not None, 90), log.read_text()
        assert proc.poll() is None, log.read_text()[-3000:]
        created = httpx.post(f"{base}/v1/items", json={"name": "stacked", "price": 3})
        assert created.status_code == 201, created.text
        assert httpx.get(f"{base}{created.headers['location']}").status_code == 200
    finally:
        code = stop_group(proc)
        pg.drop_database(database)  # IF EXISTS: a throwaway cluster of its own took it along
    output = log.read_text()
    assert "PgBouncer 1." in output and f"database {database}" in output
    assert code in (0, -signal.SIGTERM), output[-2000:]


def _database_exists(pg: PostgresServer, name: str) -> bool:
    return bool(
        pg.fetchval("postgres", f"SELECT count(*) FROM pg_database WHERE datname = '{name}'")
    )


@pytest.mark.postgres
def test_make_stack_without_pgbouncer_says_so_before_creating_anything(
    pg: PostgresServer,
) -> None:
    database = f"itemstream_stack_none_{os.getpid()}"
    env = {
        **os.environ,
        "STACK_DATABASE": database,
        "PGBOUNCER_MODERN": "/nonexistent/pgbouncer",
        "PGBOUNCER_LEGACY": "/nonexistent/pgbouncer",
    }
    done = subprocess.run(
        [sys.executable, "scripts/local_stack.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "no PgBouncer found" in done.stderr and "apt-get install pgbouncer" in done.stderr
    assert "Traceback" not in done.stderr
    assert not _database_exists(pg, database), "a database was left behind"


# --- compose.yaml ---------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def test_compose_file_follows_the_compose_specification() -> None:
    path = os.environ.get("COMPOSE_SCHEMA")
    if not path:
        cached = Path.home() / ".cache" / "itemstream" / "compose" / "compose-spec.json"
        path = str(cached) if cached.exists() else None
    if path is None:
        missing("the Compose schema (scripts/install_compose_schema.py; `make test` fetches it)")
    assert path is not None
    schema = json.loads(Path(path).read_text())
    jsonschema.Draft201909Validator(schema).validate(compose())


def test_compose_references_exist() -> None:
    spec = compose()
    targets = set(re.findall(r"^FROM \S+ AS (\w+)", (ROOT / "Dockerfile").read_text(), re.M))
    for name, service in spec["services"].items():
        build = service.get("build")
        if build:
            assert build["target"] in targets, name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), (name, source)
            else:
                assert source in spec.get("volumes", {}), (name, source)
        for dependency in service.get("depends_on", {}):
            assert dependency in spec["services"], (name, dependency)
    # The app's environment is a valid production configuration.
    app_env = {k.lower(): v for k, v in spec["services"]["app"]["environment"].items()}
    Settings(_env_file=None, **app_env)


@pytest.mark.postgres
@pytest.mark.slow
def test_compose_stack_runs_as_processes(tmp_path: Path) -> None:
    """What compose.yaml runs, minus the containers: its PgBouncer config and the app's
    environment (service names mapped to loopback) against a PostgreSQL set up as the
    postgres service's environment says."""
    binary = find_binary(MODERN)
    if binary is None:
        missing("no modern PgBouncer; run `make test`")
    assert binary is not None
    spec = compose()["services"]
    db_env = spec["postgres"]["environment"]
    pg = throwaway_cluster()
    work = Path(tempfile.mkdtemp(prefix="itemstream-compose-"))
    bouncer: subprocess.Popen[bytes] | None = None
    app: subprocess.Popen[bytes] | None = None
    try:
        run_coroutine(lambda: _postgres_as_compose_sets_it_up(pg, db_env))
        bouncer_port, app_port = free_port(), free_port()
        ini = (ROOT / "compose" / "pgbouncer.ini").read_text()
        ini = ini.replace("host=postgres port=5432", f"host=127.0.0.1 port={pg.port}")
        ini = ini.replace("listen_port = 6432", f"listen_port = {bouncer_port}")
        ini = ini.replace("listen_addr = 0.0.0.0", "listen_addr = 127.0.0.1")
        ini = ini.replace("/etc/pgbouncer", str(work)) + f"logfile = {work / 'pgb.log'}\n"
        (work / "pgbouncer.ini").write_text(ini)
        shutil.copy(ROOT / "compose" / "userlist.txt", work / "userlist.txt")
        user = unprivileged_user()
        hand_over(work, user)
        work.chmod(0o755)
        argv = [binary, *(["-u", user] if user else []), str(work / "pgbouncer.ini")]
        bouncer = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(bouncer_port, 10, bouncer)

        def mapped(value: str) -> str:
            value = value.replace("@pgbouncer:6432", f"@127.0.0.1:{bouncer_port}")
            return value.replace("@postgres:5432", f"@127.0.0.1:{pg.port}")

        env = clean_env(**{k: mapped(str(v)) for k, v in spec["app"]["environment"].items()})
        env.pop("REDIS_URL")
        env.update(RATE_LIMIT_ENABLED="false", LOG_FORMAT="json")
        migrated = run_cli(*spec["migrate"]["command"], env=env, timeout=120)
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
        env.update(PORT=str(app_port), PYTHONPATH=str(ROOT))
        app = _start([sys.executable, "-m", "app", "serve"], env, tmp_path / "app.log")
        base = f"http://127.0.0.1:{app_port}"
        assert wait_until(lambda: _answers(base), 60), (tmp_path / "app.log").read_text()
        created = httpx.post(f"{base}/v1/items", json={"name": "composed", "price": 1})
        assert created.status_code == 201, created.text
        assert httpx.get(f"{base}{created.headers['location']}").status_code == 200
    finally:
        if app is not None:
            stop_group(app)
        if bouncer is not None:
            stop(bouncer)
        pg.close()
        shutil.rmtree(work, ignore_errors=True)


async def _postgres_as_compose_sets_it_up(pg: PostgresServer, env: dict[str, str]) -> None:
    conn = await asyncpg.connect(host=pg.host, port=pg.port, user="postgres", database="postgres")
    try:
        user, password = env["POSTGRES_USER"], env["POSTGRES_PASSWORD"]
        await conn.execute(f"CREATE ROLE {user} LOGIN PASSWORD '{password}'")
        await conn.execute(f"CREATE DATABASE {env['POSTGRES_DB']} OWNER {user}")
    finally:
        await conn.close()


# --- logs --------------------------------------------------------------------------------------


def _record(message: str, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("app.test", logging.INFO, __file__, 1, message, None, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_console_format_is_one_readable_line() -> None:
    line = ConsoleFormatter().format(_record("hello", color_message="\x1b[1mhello\x1b[0m", n=3))
    assert "\n" not in line and "\x1b" not in line
    assert line.split()[1:4] == ["INFO", "app.test", "hello"] and "n=3" in line


def test_json_format_drops_the_ansi_copy() -> None:
    entry = json.loads(JsonFormatter().format(_record("hello", color_message="\x1b[1mhello")))
    assert "color_message" not in entry and entry["msg"] == "hello"


def test_log_format_defaults() -> None:
    def formatter(**values: str) -> object:
        settings = Settings(_env_file=None, **values)  # type: ignore[arg-type]
        config = logging_config("INFO", settings.telemetry.log_format)
        return config["formatters"]["main"]["()"]

    assert formatter() is ConsoleFormatter
    assert formatter(environment="production", database_url="postgresql://a@b/c") is JsonFormatter
    assert formatter(log_format="json") is JsonFormatter


# --- the docs ----------------------------------------------------------------------------------


def test_readme_first_screen_is_a_map() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 70, "the README is a map; the reference lives in docs/"
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
    for command in ("make run", "make test", "make stack", "docker compose up"):
        assert command in readme


def test_configuration_reference_is_generated_from_settings() -> None:
    fresh = subprocess.run(
        [sys.executable, "scripts/settings_doc.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert fresh.returncode == 0, fresh.stderr
    documented = set(
        re.findall(r"^\| `([A-Z0-9_]+)`", (ROOT / "docs" / "configuration.md").read_text(), re.M)
    )
    assert documented == set(ENV_VARS)


def test_repository_hygiene() -> None:
    license_text = (ROOT / "LICENSE").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = "Apache-2.0"' in pyproject and "Apache License" in license_text
    assert "Version 2.0" in license_text
    for name in ("CONTRIBUTING.md", "CHANGELOG.md"):
        assert (ROOT / name).stat().st_size > 500, name
    hooks = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    entries = " ".join(h["entry"] for repo in hooks["repos"] for h in repo["hooks"])
    ci = (ROOT / ".ci" / "run").read_text()
    for tool in ("ruff check", "mypy"):
        assert tool in entries and tool in ci, tool


def test_relative_links_in_the_docs_resolve() -> None:
    pages = [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md")]
    for page in pages:
        for target in re.findall(r"\]\(([^)]+)\)", page.read_text()):
            path = target.split("#")[0]
            if path and not path.startswith(("http://", "https://", "mailto:")):
                assert (page.parent / path).exists(), f"{page.name}: {target}"


def test_the_console_access_line_states_each_field_once() -> None:
    from app.telemetry.access import log_request

    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(ConsoleFormatter().format(record))

    logger = logging.getLogger("itemstream.access")
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        log_request(
            quiet=False,
            method="POST",
            route="/v1/items/{item_id}",
            path="/v1/items/42",
            status=201,
            seconds=0.0123,
            principal="alice",
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    line = lines[0].split(" ", 1)[1]  # after the time of day, which has digits of its own
    assert len(lines) == 1
    assert "POST /v1/items/{item_id} 201" in line
    for value in ("POST", "/v1/items/{item_id}", "201", "/v1/items/42", "12.3", "alice"):
        assert line.count(value) == 1, (value, line)
    assert "path=/v1/items/42" in line and "duration_ms=12.3" in line and "http=" not in line


def test_one_version_everywhere() -> None:
    """The package's version is the release's: the CLI, the OpenAPI document, /livez, the
    build_info metric, the image's label default and the chart's appVersion say the same."""
    import tomllib

    from prometheus_client import CollectorRegistry, generate_latest

    from app import __version__
    from app.main import create_app
    from app.telemetry.metrics import AppMetrics

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert __version__ == declared
    shown = run_cli("--version", env=clean_env())
    assert shown.stdout.strip() == f"itemstream {declared}", shown.stdout + shown.stderr
    app = create_app(Settings(_env_file=None, database_url="sqlite+aiosqlite:///:memory:"))
    assert app.version == declared
    from fastapi.testclient import TestClient

    with TestClient(app) as client:  # the probe's answer names the build too
        assert client.get("/livez").json() == {
            "status": "ok",
            "detail": None,
            "version": declared,
            "revision": "unknown",
        }
    registry = CollectorRegistry()
    AppMetrics(registry)
    assert f'itemstream_build_info{{revision="unknown",version="{declared}"}} 1.0' in (
        generate_latest(registry).decode()
    )
    chart = yaml.safe_load((ROOT / "chart" / "Chart.yaml").read_text())
    assert chart["appVersion"] == declared
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"ARG VERSION={declared}" in dockerfile


@pytest.mark.slow
def test_pages_outside_the_api_are_logged_by_the_route_that_served_them(tmp_path: Path) -> None:
    """The docs, their assets and the OpenAPI document are named by their route in the access
    log and the metrics, not `unmatched` (left for what no route serves); gunicorn's and
    uvicorn's lines come from `gunicorn` and `uvicorn`, not their `*.error` loggers."""
    env = clean_env(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'routes.db'}")
    paths = ["/docs", "/openapi.json", "/static/docs/swagger-ui.css", "/nowhere"]
    with serve(env) as server:
        for path in paths:
            httpx.get(f"{server.base}{path}", timeout=10)
        assert wait_until(lambda: server.output().count('"itemstream.access"') >= 4, 10)
        lines = server.json_lines()
    routes = {
        line["http"]["path"]: line["http"]["route"]
        for line in lines
        if line.get("logger") == "itemstream.access"
    }
    assert routes == {
        "/docs": "/docs",
        "/openapi.json": "/openapi.json",
        "/static/docs/swagger-ui.css": "/static/docs/{path}",
        "/nowhere": "unmatched",
    }
    loggers = {line.get("logger") for line in lines}
    assert {"gunicorn", "uvicorn"} <= loggers
    assert not loggers & {"gunicorn.error", "uvicorn.error"}


@pytest.mark.slow
def test_serve_reload_logs_in_the_service_format(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'reload.db'}")
    log = tmp_path / "reload.log"
    proc = _start([sys.executable, "-m", "app", "serve", "--reload", "--port", str(port)], env, log)
    try:
        assert wait_until(lambda: _answers(f"http://127.0.0.1:{port}"), 60), log.read_text()
    finally:
        stop_group(proc)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(parsed) == len(lines), [line for line in lines if not line.startswith("{")]
    assert any(entry["logger"] == "uvicorn" for entry in parsed), lines
