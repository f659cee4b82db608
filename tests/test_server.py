"""The real entry point as a process: gunicorn with uvicorn workers, on Postgres through
PgBouncer and on the embedded SQLite default."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from harness.pgbouncer import PgBouncer
from harness.postgres import PostgresServer
from harness.servers import clean_env, pooled_env, serve

pytestmark = pytest.mark.slow


def test_gunicorn_on_postgres_through_pgbouncer(
    pg: PostgresServer, pgbouncer_modern: PgBouncer, schema_db: str
) -> None:
    env = pooled_env(pg, pgbouncer_modern, schema_db)
    with serve(env) as server:
        created = httpx.post(f"{server.base}/v1/items", json={"name": "served", "price": 2})
        assert created.status_code == 201
        fetched = httpx.get(f"{server.base}{created.headers['location']}")
        assert fetched.json()["name"] == "served"
        assert server.terminate() == 0, server.output()
        assert server.output().count("Booting worker") == 2, server.output()


def test_embedded_sqlite_default(tmp_path: Path) -> None:
    """What a new user gets: no configuration, a SQLite file, migrations applied at start."""
    env = clean_env()
    env.pop("ENVIRONMENT", None)
    with serve(env, tmp_path) as server:
        assert (tmp_path / "itemstream.db").exists()
        created = httpx.post(f"{server.base}/v1/items", json={"name": "local", "price": 1})
        assert created.status_code == 201
        assert httpx.get(f"{server.base}/docs").status_code == 200
        assert httpx.get(f"{server.base}/v1/items?include_total=true").json()["total"] == 1
    assert os.path.getsize(tmp_path / "itemstream.db") > 0
