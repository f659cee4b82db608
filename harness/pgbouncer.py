"""Real PgBouncer processes on free loopback ports, in transaction pooling mode.

- modern (>= 1.21): `max_prepared_statements` tracks asyncpg's named statements; the app runs
  with DB_POOLER=pgbouncer and keeps its statement caches.
- legacy (e.g. Debian's 1.18): no prepared-statement support; the app runs with
  DB_POOLER=pgbouncer-legacy, and PgBouncer must discard the unique-named statements the app
  leaves behind (`server_reset_query = DEALLOCATE ALL` + `server_reset_query_always = 1`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness.processes import free_port, hand_over, unprivileged_user, wait_for_port

MODERN = "modern"
LEGACY = "legacy"


def version_of(binary: str) -> tuple[int, int]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"PgBouncer (\d+)\.(\d+)", out)
    if match is None:
        raise RuntimeError(f"cannot read the PgBouncer version from: {out!r}")
    return int(match.group(1)), int(match.group(2))


def find_binary(kind: str) -> str | None:
    """PGBOUNCER_MODERN / PGBOUNCER_LEGACY, else a `pgbouncer` on PATH of the right version."""
    explicit = os.environ.get(f"PGBOUNCER_{kind.upper()}")
    candidates = [explicit] if explicit else [shutil.which("pgbouncer"), "/usr/sbin/pgbouncer"]
    for candidate in candidates:
        if not candidate or not os.path.exists(candidate):
            continue
        modern = version_of(candidate) >= (1, 21)
        if modern == (kind == MODERN):
            return candidate
    return None


def render_ini(
    *,
    kind: str,
    port: int,
    server_host: str,
    server_port: int,
    work_dir: Path,
    pool_size: int = 10,
    max_client_conn: int = 400,
) -> str:
    lines = [
        "[databases]",
        f"* = host={server_host} port={server_port}",
        "",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {port}",
        "unix_socket_dir =",
        "auth_type = trust",
        f"auth_file = {work_dir / 'userlist.txt'}",
        "admin_users = postgres",
        "pool_mode = transaction",
        f"max_client_conn = {max_client_conn}",
        f"default_pool_size = {pool_size}",
        "ignore_startup_parameters = extra_float_digits",
        # Fail queued clients with the app (DB_REQUEST_TIMEOUT), not after PgBouncer's 120 s.
        "query_wait_timeout = 5",
        # Connection churn under load would otherwise dominate the log.
        "log_connections = 0",
        "log_disconnections = 0",
        "server_connect_timeout = 3",
        "server_login_retry = 1",
        f"logfile = {work_dir / 'pgbouncer.log'}",
        f"pidfile = {work_dir / 'pgbouncer.pid'}",
    ]
    if kind == MODERN:
        lines.append("max_prepared_statements = 200")
        # Safety net for session state leaked by any client; cheap on modern versions.
        lines += ["server_reset_query = DISCARD ALL", "server_reset_query_always = 0"]
    else:
        lines += ["server_reset_query = DEALLOCATE ALL", "server_reset_query_always = 1"]
    return "\n".join(lines) + "\n"


@dataclass
class PgBouncer:
    binary: str
    kind: str
    server_host: str
    server_port: int
    pool_size: int = 10
    port: int = 0
    work_dir: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def version(self) -> tuple[int, int]:
        return version_of(self.binary)

    @property
    def pooler_setting(self) -> str:
        return "pgbouncer" if self.kind == MODERN else "pgbouncer-legacy"

    def start(self) -> PgBouncer:
        if self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix=f"itemstream-pgb-{self.kind}-"))
            self.work_dir.chmod(0o755)
            self.port = self.port or free_port()
            (self.work_dir / "userlist.txt").write_text('"postgres" ""\n')
            ini = render_ini(
                kind=self.kind,
                port=self.port,
                server_host=self.server_host,
                server_port=self.server_port,
                work_dir=self.work_dir,
                pool_size=self.pool_size,
            )
            (self.work_dir / "pgbouncer.ini").write_text(ini)
        user = unprivileged_user()
        hand_over(self.work_dir, user)
        argv = [self.binary, str(self.work_dir / "pgbouncer.ini")]
        if user is not None:
            argv[1:1] = ["-u", user]
        # Everything also goes to the logfile; an unread stderr pipe would fill up and block
        # PgBouncer (1.24 logs to both).
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, 15, self.process)
        return self

    def stop(self) -> None:
        """Kill at once, like a crash: from 1.23 SIGTERM waits for every client to leave."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def close(self) -> None:
        self.stop()
        if self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def log(self) -> str:
        assert self.work_dir is not None
        path = self.work_dir / "pgbouncer.log"
        return path.read_text() if path.exists() else ""
