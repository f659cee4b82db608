"""`make stack`: the real stack as local processes, where Docker is absent (else use
compose.yaml). PostgreSQL (the local server on 127.0.0.1:5432 when it answers, else a
throwaway cluster from the local binaries), PgBouncer in transaction mode (>= 1.21 when
installed, else the older one in compatibility mode), Redis when
RATE_LIMIT_ENABLED=true, then `itemstream serve` (gunicorn, migrations first) in front.
Ctrl-C stops everything it started. Uses the same process harness as the test suite.

    make stack                       # API on http://127.0.0.1:8000 (PORT=... to change)
    STACK_DATABASE=mine make stack   # another database (default itemstream_local)

Needs PgBouncer (apt-get install pgbouncer): checked before anything is created.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.pgbouncer import LEGACY, MODERN, PgBouncer, find_binary  # noqa: E402
from harness.postgres import PostgresServer, start_or_find  # noqa: E402
from harness.processes import free_port, run_coroutine, wait_for_port  # noqa: E402

DATABASE = os.environ.get("STACK_DATABASE", "itemstream_local")


def say(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


async def _ensure_database(pg: PostgresServer) -> None:
    import asyncpg

    conn = await asyncpg.connect(
        host=pg.host, port=pg.port, user=pg.admin_url.username, database="postgres"
    )
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
            await conn.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await conn.close()


def _redis() -> tuple[str, subprocess.Popen[bytes] | None]:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit(
            "RATE_LIMIT_ENABLED=true needs redis-server (apt-get install redis-server)"
        )
    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    wait_for_port(port, 10, proc)
    return f"redis://127.0.0.1:{port}/0", proc


def main() -> int:
    # Prerequisites first: a missing one stops here, before a database or process exists.
    kind = MODERN if find_binary(MODERN) else LEGACY
    binary = find_binary(kind)
    if binary is None:
        raise SystemExit(
            "make stack: no PgBouncer found; install it (apt-get install pgbouncer) or set "
            "PGBOUNCER_MODERN to a PgBouncer >= 1.21. Nothing was started or created."
        )
    pg = start_or_find()
    where = "the local server" if pg.process is None else "a throwaway cluster (data not kept)"
    say(f"PostgreSQL: {where} at {pg.host}:{pg.port}, database {DATABASE}")
    run_coroutine(lambda: _ensure_database(pg))

    bouncer = PgBouncer(binary=binary, kind=kind, server_host=pg.host, server_port=pg.port)
    bouncer.start()
    say(f"PgBouncer {'.'.join(map(str, bouncer.version))} ({kind}) at 127.0.0.1:{bouncer.port}")

    started: list[subprocess.Popen[bytes]] = []
    env = dict(os.environ)
    env.update(
        DATABASE_URL=pg.url(DATABASE, host="127.0.0.1", port=bouncer.port).render_as_string(
            hide_password=False
        ),
        MIGRATION_DATABASE_URL=pg.url(DATABASE).render_as_string(hide_password=False),
        DB_POOLER=bouncer.pooler_setting,
    )
    env.setdefault("ENVIRONMENT", "development")  # serve migrates first outside production
    if env.get("RATE_LIMIT_ENABLED", "").lower() == "true" and not env.get("REDIS_URL"):
        env["REDIS_URL"], redis = _redis()
        if redis is not None:
            started.append(redis)
        say(f"Redis at {env['REDIS_URL']}")
    app = subprocess.Popen([sys.executable, "-m", "app", "serve"], cwd=ROOT, env=env)

    def stop(signum: int, _frame: object) -> None:
        app.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        return app.wait()
    finally:
        deadline = time.monotonic() + 30
        while app.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        for proc in started:
            proc.terminate()
        bouncer.close()
        pg.close()  # stops a throwaway cluster; the local server and its database stay


if __name__ == "__main__":
    raise SystemExit(main())
