"""The real entry point as a process: gunicorn with uvicorn workers, on Postgres through
PgBouncer and on the embedded SQLite default."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.support.pgbouncer import PgBouncer
from tests.support.postgres import PostgresServer
from tests.support.processes import free_port, wait_until
from tests.test_migrations import cli_env

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@contextmanager
def serve(env: dict[str, str], cwd: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--port", str(port)],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None

    try:
        assert wait_until(ready, 60), "server never became ready"
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_gunicorn_on_postgres_through_pgbouncer(
    pg: PostgresServer, pgbouncer_modern: PgBouncer, schema_db: str
) -> None:
    env = cli_env(
        DATABASE_URL=pg.url(schema_db, port=pgbouncer_modern.port).render_as_string(
            hide_password=False
        ),
        MIGRATION_DATABASE_URL=pg.url(schema_db).render_as_string(hide_password=False),
        DB_POOLER="pgbouncer",
        WEB_CONCURRENCY="2",
    )
    with serve(env, ROOT) as (base, proc):
        created = httpx.post(f"{base}/v1/items", json={"name": "served", "price": 2})
        assert created.status_code == 201
        assert httpx.get(f"{base}{created.headers['location']}").json()["name"] == "served"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, output
        assert output.count("Booting worker") == 2, output


def test_embedded_sqlite_default(tmp_path: Path) -> None:
    """What a new user gets: no configuration, a SQLite file, migrations applied at start."""
    env = cli_env()
    env.pop("ENVIRONMENT", None)
    with serve(env, tmp_path) as (base, _proc):
        assert (tmp_path / "itemstream.db").exists()
        assert httpx.post(f"{base}/v1/items", json={"name": "local", "price": 1}).status_code == 201
        assert httpx.get(f"{base}/docs").status_code == 200
        assert httpx.get(f"{base}/v1/items").json()["total"] == 1
    assert os.path.getsize(tmp_path / "itemstream.db") > 0
