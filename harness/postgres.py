"""A PostgreSQL server for the test run: TEST_POSTGRES_URL, else 127.0.0.1:5432 if it answers,
else a throwaway cluster started from the local binaries. Each run makes its own databases."""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from sqlalchemy.engine import URL, make_url

from harness.processes import (
    free_port,
    hand_over,
    run_as,
    run_coroutine,
    stop,
    unprivileged_user,
    wait_for_port,
)


def _find_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return found[0] if found else shutil.which(name)


@dataclass
class PostgresServer:
    admin_url: URL  # a superuser on the maintenance database
    databases: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    data_dir: Path | None = None
    argv: list[str] = field(default_factory=list)  # how a throwaway cluster was started

    @property
    def host(self) -> str:
        return self.admin_url.host or "127.0.0.1"

    @property
    def port(self) -> int:
        return self.admin_url.port or 5432

    def url(self, database: str, *, host: str | None = None, port: int | None = None) -> URL:
        return self.admin_url.set(
            drivername="postgresql+asyncpg",
            database=database,
            host=host or self.host,
            port=port or self.port,
        )

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(
            host=self.host,
            port=self.port,
            user=self.admin_url.username,
            password=self.admin_url.password,
            database=self.admin_url.database or "postgres",
        )
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def fetchval(self, database: str, sql: str) -> object:
        """The first value of a query's first row, on `database` (as the superuser)."""

        async def run() -> object:
            conn = await asyncpg.connect(
                host=self.host,
                port=self.port,
                user=self.admin_url.username,
                password=self.admin_url.password,
                database=database,
            )
            try:
                return await conn.fetchval(sql)
            finally:
                await conn.close()

        return run_coroutine(run)

    def create_database(self, prefix: str = "itemstream_test") -> str:
        name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
        run_coroutine(lambda: self._admin(f'CREATE DATABASE "{name}"'))
        self.databases.append(name)
        return name

    def drop_database(self, name: str) -> None:
        run_coroutine(lambda: self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        if name in self.databases:
            self.databases.remove(name)

    def crash(self) -> None:
        """kill -9 the postmaster and every backend, as a node or OOM kill would (throwaway
        clusters only: never the shared server)."""
        assert self.data_dir is not None and self.process is not None, "not a throwaway cluster"
        postmaster = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
        for pid in [postmaster, *map(int, children)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(10)

    def restart(self, timeout: float = 30) -> None:
        """Start the cluster (again, after a crash: recovery runs first)."""
        assert self.argv, "not a throwaway cluster"
        self.process = subprocess.Popen(
            self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port, timeout, self.process)
        # The port opens before startup (or crash recovery) ends: "the database system is
        # starting up" until then.
        deadline = time.monotonic() + timeout
        while not run_coroutine(lambda: _answers(self.admin_url)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"PostgreSQL on port {self.port} never accepted a connection")
            time.sleep(0.1)

    def close(self) -> None:
        for name in list(self.databases):
            try:
                self.drop_database(name)
            except Exception as error:  # keep cleaning the rest
                print(f"could not drop test database {name}: {error}")
        if self.process is not None:
            stop(self.process)
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir.parent, ignore_errors=True)


async def _answers(url: URL) -> bool:
    try:
        conn = await asyncpg.connect(
            host=url.host,
            port=url.port or 5432,
            user=url.username,
            password=url.password,
            database=url.database or "postgres",
            timeout=3,
        )
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


def throwaway_cluster(
    *, start: bool = True, settings: dict[str, str] | None = None
) -> PostgresServer:
    """A new cluster of our own; `start=False` only creates it (`restart()` starts it).
    `settings` are passed as `-c name=value` (a bench's shared_buffers, its log)."""
    initdb, postgres = _find_bin("initdb"), _find_bin("postgres")
    if initdb is None or postgres is None:
        raise RuntimeError(
            "no PostgreSQL reachable (set TEST_POSTGRES_URL) and no initdb/postgres binaries "
            "to start a throwaway one (apt-get install postgresql)"
        )
    user = unprivileged_user()
    base = Path(tempfile.mkdtemp(prefix="itemstream-pg-"))
    base.chmod(0o755)
    data = base / "data"
    data.mkdir()
    hand_over(base, user)
    subprocess.run(
        run_as(
            user,
            [
                initdb,
                "-D",
                str(data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
        ),
        check=True,
        capture_output=True,
    )
    port = free_port()
    argv = run_as(
        user,
        [
            postgres,
            "-D",
            str(data),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={base}",
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
            *[arg for name, value in (settings or {}).items() for arg in ("-c", f"{name}={value}")],
        ],
    )
    url = make_url(f"postgresql://postgres@127.0.0.1:{port}/postgres")
    server = PostgresServer(admin_url=url, data_dir=data, argv=argv)
    if start:
        server.restart()
    return server


def start_or_find() -> PostgresServer:
    configured = os.environ.get("TEST_POSTGRES_URL")
    if configured:
        return PostgresServer(admin_url=make_url(configured))
    local = make_url("postgresql://postgres@127.0.0.1:5432/postgres")
    if run_coroutine(lambda: _answers(local)):
        return PostgresServer(admin_url=local)
    return throwaway_cluster()
