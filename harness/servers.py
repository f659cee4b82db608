"""Run `itemstream serve` (gunicorn + uvicorn workers) as a real process on a free port."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import ENV_VARS, looks_like_a_setting
from harness.pgbouncer import PgBouncer
from harness.postgres import PostgresServer
from harness.processes import free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]


# Variables the libraries under the service read themselves: the OpenTelemetry SDK, gunicorn,
# prometheus_client.
FOREIGN_PREFIXES = ("OTEL_", "GUNICORN_", "PROMETHEUS_")


def clean_env(**values: str) -> dict[str, str]:
    """The current environment without any of the service's settings (every variable of the
    settings tree, in any case, as the settings read them) or its libraries', plus `values`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key.upper() not in ENV_VARS
        and not key.upper().startswith(FOREIGN_PREFIXES)
        and not looks_like_a_setting(key.upper())  # a production server would refuse it
    }
    env["LOG_FORMAT"] = "json"  # the tests read the logs as JSON; the console format has its own
    env.update(values)
    return env


def pooled_env(
    pg: PostgresServer, bouncer: PgBouncer, database: str, **values: str
) -> dict[str, str]:
    """`clean_env` for a service on PostgreSQL through `bouncer` (migrations go direct, as the
    chart's migration Job does), two workers unless `values` says otherwise."""
    return clean_env(
        DATABASE_URL=pg.url(database, port=bouncer.port).render_as_string(hide_password=False),
        MIGRATION_DATABASE_URL=pg.url(database).render_as_string(hide_password=False),
        DB_POOLER="pgbouncer",
        **{"WEB_CONCURRENCY": "2", **values},
    )


def production_env(
    pg: PostgresServer, bouncer: PgBouncer, database: str, **values: str
) -> dict[str, str]:
    """`pooled_env` with production settings and no identity provider, as the chart runs a
    try-out in production mode (a cursor key of its own per call)."""
    return pooled_env(
        pg,
        bouncer,
        database,
        **{
            "ENVIRONMENT": "production",
            "AUTH_ALLOW_UNAUTHENTICATED": "true",
            "CURSOR_SECRETS": secrets.token_hex(16),
            **values,
        },
    )


@dataclass
class Server:
    base: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def json_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    continue
        return lines

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@contextmanager
def serve(env: dict[str, str], cwd: Path = ROOT, *, port: int | None = None) -> Iterator[Server]:
    port = port or free_port()
    log_file = tempfile.NamedTemporaryFile(prefix="itemstream-serve-", suffix=".log", delete=False)  # noqa: SIM115
    log_path = Path(log_file.name)
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--port", str(port)],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(cwd)},  # the code of `cwd` (e.g. an earlier release)
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    log_file.close()
    server = Server(base=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path)

    import httpx  # here: the unit tier imports this module for clean_env alone

    def ready() -> bool:
        if proc.poll() is not None:
            return True
        try:
            return httpx.get(f"{server.base}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_until(ready, 60), f"server never became ready:\n{server.output()[-3000:]}"
        assert proc.poll() is None, f"server exited:\n{server.output()[-3000:]}"
        yield server
    finally:
        server.terminate()
        log_path.unlink(missing_ok=True)


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 60, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """`python -m app ARGS` from the repository root (or the tree of another release); output
    captured, never raises."""
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(cwd)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
