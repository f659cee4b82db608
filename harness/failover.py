"""A PostgreSQL failover rig on loopback (etcd and HAProxy from Debian, Patroni from PyPI):
etcd as Patroni's store, two Patroni nodes (a primary and a streaming replica), HAProxy
routing to whichever node
Patroni's REST API calls the primary (the layout Patroni documents). tests/test_failover.py
puts the chart's PgBouncer and the app, as the chart runs them, in front of HAProxy.

Patroni's timings are as low as its rule allows (loop_wait + 2 * retry_timeout <= ttl):
TTL 20 s (Patroni 4 raises any lower ttl to 20), loop_wait 1 s, retry_timeout 3 s. So a
lost primary's leader key expires within 20 s and the replica promotes at its next loop;
HAProxy checks every second and marks a node down after two failures, closing its sessions
(`on-marked-down shutdown-sessions`).

`Rig(synchronous=...)` chooses the durability: with Patroni's synchronous_mode a commit
returns only once the replica has the WAL, and only that replica may be promoted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url

from harness.postgres import _find_bin
from harness.processes import (
    free_port,
    hand_over,
    run_as,
    run_coroutine,
    stop,
    unprivileged_user,
    wait_until,
)

TTL = 20  # the lowest Patroni >= 3.1 accepts (lower values are raised to it)
LOOP_WAIT = 1
RETRY_TIMEOUT = 3
SCOPE = "itemstream"


# Patroni from PyPI, in a virtual environment of its own that scripts/setup.sh makes (readable
# by the postgres user it runs as under root). Debian 12's Patroni 3.0.2 is refused: with
# etcd3, a primary that resumes after a pause longer than ttl overwrites the new leader's key
# and the promoted replica is rewound, losing every write it acknowledged
# (test_the_primary_is_cut_off found it; fixed in 3.0.3, patroni/patroni#2689).
PATRONI_VERSION = "4.1.5"
OLDEST_SAFE_PATRONI = (3, 0, 3)


def patroni_dir() -> Path:
    base = Path("/var/cache/itemstream") if os.geteuid() == 0 else Path.home() / ".cache/itemstream"
    return base / f"patroni-{PATRONI_VERSION}" / "bin"


def available() -> str | None:
    """Why the rig cannot run here, or None."""
    for binary in ("etcd", "haproxy", "patroni", "patronictl"):
        if shutil.which(binary, path=_search_path()) is None:
            return f"{binary} is not installed (scripts/setup.sh installs it)"
    version = _patroni_version()
    if version < OLDEST_SAFE_PATRONI:
        return (
            f"Patroni {'.'.join(map(str, version))} can lose acknowledged writes after a paused "
            f"primary resumes (patroni/patroni#2689, fixed in 3.0.3): scripts/setup.sh installs "
            f"{PATRONI_VERSION} from PyPI into {patroni_dir().parent}"
        )
    if _find_bin("postgres") is None:
        return "no PostgreSQL server binaries"
    return None


def _search_path() -> str:
    return os.pathsep.join([str(patroni_dir()), os.environ.get("PATH", "")])


def _patroni_version() -> tuple[int, ...]:
    done = subprocess.run(
        [_bin("patroni"), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    found = re.search(r"(\d+)\.(\d+)\.(\d+)", done.stdout)
    return tuple(int(part) for part in found.groups()) if found else (0,)


@dataclass
class Node:
    name: str
    pg_port: int
    api_port: int
    config: Path
    log: Path
    data_dir: Path
    process: subprocess.Popen[bytes] | None = None

    def role(self) -> str | None:
        """What this node's Patroni says it is ('primary', 'replica'), None if it is down."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.api_port}/patroni", timeout=1
            ) as answer:
                status = json.loads(answer.read())
        except (OSError, ValueError):
            return None
        role = status.get("role")
        if status.get("state") != "running":
            return None
        return "primary" if role in ("master", "primary") else str(role)

    def postmaster_pid(self) -> int | None:
        pid_file = self.data_dir / "postmaster.pid"
        try:
            return int(pid_file.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None


@dataclass
class Rig:
    synchronous: bool = True
    work: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="itemstream-ha-")))
    nodes: list[Node] = field(default_factory=list)
    etcd_port: int = 0
    haproxy_port: int = 0
    etcd: subprocess.Popen[bytes] | None = None
    haproxy: subprocess.Popen[bytes] | None = None
    _user: str | None = None

    # -- addresses ---------------------------------------------------------------------------

    def url(self, database: str = "postgres") -> URL:
        """Through HAProxy: the primary (SQLAlchemy's form, for the app and migrations)."""
        return make_url(f"postgresql+asyncpg://postgres@127.0.0.1:{self.haproxy_port}/{database}")

    def dsn(self, database: str = "postgres") -> str:
        """Through HAProxy, for asyncpg.connect()."""
        return f"postgresql://postgres@127.0.0.1:{self.haproxy_port}/{database}"

    def node_url(self, node: Node, database: str = "postgres") -> URL:
        return make_url(f"postgresql://postgres@127.0.0.1:{node.pg_port}/{database}")

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Rig:
        self._user = unprivileged_user()
        self.work.chmod(0o755)
        self._start_etcd()
        bin_dir = Path(_find_bin("postgres") or "").parent
        for index in range(2):
            self.nodes.append(self._write_node(f"pg{index}", bin_dir))
        hand_over(self.work, self._user)
        self._start_node(self.nodes[0])
        assert wait_until(lambda: self.nodes[0].role() == "primary", 60), self.logs()
        self._start_node(self.nodes[1])
        assert wait_until(lambda: self.nodes[1].role() == "replica", 90), self.logs()
        if self.synchronous:
            assert wait_until(self._has_sync_standby, 30), self.logs()
        self._start_haproxy()
        return self

    def close(self) -> None:
        for node in self.nodes:
            self.thaw_node(node)  # a frozen process would hold SIGTERM until continued
            self._stop(node.process)
            pid = node.postmaster_pid()
            if pid is not None:
                _kill_postgres(pid)
        self._stop(self.haproxy)
        self._stop(self.etcd)
        if os.environ.get("ITEMSTREAM_KEEP_RIG"):  # the logs and data, for a post-mortem
            print(f"the rig's files are kept in {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> Rig:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- state -------------------------------------------------------------------------------

    def primary(self) -> Node | None:
        for node in self.nodes:
            if node.role() == "primary":
                return node
        return None

    def replica(self) -> Node:
        primary = self.primary()
        return next(node for node in self.nodes if node is not primary)

    def members(self) -> list[dict[str, Any]]:
        """Patroni's view of the cluster (GET /cluster on any node that answers)."""
        for node in self.nodes:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{node.api_port}/cluster", timeout=1
                ) as answer:
                    members: list[dict[str, Any]] = json.loads(answer.read()).get("members", [])
                    return members
            except (OSError, ValueError):
                continue
        return []

    def _has_sync_standby(self) -> bool:
        return any(
            m.get("role") == "sync_standby" and m.get("state") in ("running", "streaming")
            for m in self.members()
        )

    # -- events ------------------------------------------------------------------------------

    def switchover(self) -> None:
        """A planned switchover to the replica (patronictl)."""
        leader, candidate = self.primary(), self.replica()
        assert leader is not None
        subprocess.run(
            [
                _bin("patronictl"),
                "-c",
                str(leader.config),
                "switchover",
                "--leader",
                leader.name,
                "--candidate",
                candidate.name,
                "--force",
                SCOPE,
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def lose_node(self, node: Node) -> None:
        """The node is gone: its Patroni and its PostgreSQL killed (SIGKILL), so the leader key
        must expire before the replica may take over."""
        pid = node.postmaster_pid()
        if node.process is not None:
            # Patroni runs under runuser in a session of its own; PostgreSQL in another.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.process.pid, signal.SIGKILL)
            node.process.wait(10)
            node.process = None
        if pid is not None:
            _kill_postgres(pid)

    def freeze_node(self, node: Node) -> None:
        """The node stops answering without closing anything (SIGSTOP to its Patroni and its
        PostgreSQL), as behind a network partition: connections to it hang instead of being
        reset, its leader key expires, the replica takes over."""
        self._signal_node(node, signal.SIGSTOP)

    def thaw_node(self, node: Node) -> None:
        """The partition heals (SIGCONT): its Patroni finds another leader and demotes it."""
        self._signal_node(node, signal.SIGCONT)

    def _signal_node(self, node: Node, sig: signal.Signals) -> None:
        if node.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.process.pid, sig)
        pid = node.postmaster_pid()
        if pid is not None:
            for each in [pid, *_children(pid)]:
                _kill(each, sig)

    def kill_postgres(self, node: Node) -> None:
        """PostgreSQL alone dies (SIGKILL to the postmaster); Patroni restarts it."""
        pid = node.postmaster_pid()
        assert pid is not None, "no postmaster"
        _kill_postgres(pid)

    def logs(self) -> str:
        parts = []
        for path in sorted(self.work.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    # -- processes ---------------------------------------------------------------------------

    def _start_etcd(self) -> None:
        self.etcd_port, peer = free_port(), free_port()
        data = self.work / "etcd"
        log = open(self.work / "etcd.log", "wb")  # noqa: SIM115
        self.etcd = subprocess.Popen(
            [
                _bin("etcd"),
                "--name=rig",
                f"--data-dir={data}",
                f"--listen-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=rig=http://127.0.0.1:{peer}",
                "--initial-cluster-state=new",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

        def answers() -> bool:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.etcd_port}/health", timeout=1
                ) as answer:
                    return bool(json.loads(answer.read()).get("health") == "true")
            except (OSError, ValueError):
                return False

        assert wait_until(answers, 30), self.logs()

    def _write_node(self, name: str, bin_dir: Path) -> Node:
        pg_port, api_port = free_port(), free_port()
        data = self.work / name
        config = self.work / f"{name}.yml"
        sockets = self.work / f"{name}-sockets"
        sockets.mkdir()
        parameters = {
            "wal_level": "replica",
            "hot_standby": "on",
            "max_wal_senders": 5,
            "max_replication_slots": 5,
            "wal_log_hints": "on",
            "max_connections": 200,
            "unix_socket_directories": str(sockets),
            "fsync": "off",  # a killed process loses nothing the OS holds; only speed changes
        }
        document = {
            "scope": SCOPE,
            "name": name,
            "log": {"level": "INFO"},
            "restapi": {
                "listen": f"127.0.0.1:{api_port}",
                "connect_address": f"127.0.0.1:{api_port}",
            },
            "etcd3": {"hosts": f"127.0.0.1:{self.etcd_port}"},
            "bootstrap": {
                "dcs": {
                    "ttl": TTL,
                    "loop_wait": LOOP_WAIT,
                    "retry_timeout": RETRY_TIMEOUT,
                    "maximum_lag_on_failover": 1048576,
                    "synchronous_mode": self.synchronous,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": parameters,
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}, "data-checksums"],
                "pg_hba": [
                    "local all all trust",
                    "host replication all 127.0.0.1/32 trust",
                    "host all all 127.0.0.1/32 trust",
                ],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{pg_port}",
                "connect_address": f"127.0.0.1:{pg_port}",
                "data_dir": str(data),
                "bin_dir": str(bin_dir),
                "pgpass": str(self.work / f"{name}.pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres", "password": "rig"},
                    "replication": {"username": "postgres", "password": "rig"},
                    "rewind": {"username": "postgres", "password": "rig"},
                },
                "parameters": {"unix_socket_directories": str(sockets)},
                # A node that crashed while primary comes back without waiting for a human.
                "remove_data_directory_on_rewind_failure": True,
                "remove_data_directory_on_diverged_timelines": True,
            },
            "tags": {"nofailover": False, "noloadbalance": False},
        }
        # JSON is YAML: no YAML writer needed.
        config.write_text(json.dumps(document, indent=2))
        return Node(
            name=name,
            pg_port=pg_port,
            api_port=api_port,
            config=config,
            log=self.work / f"{name}.log",
            data_dir=data,
        )

    def _start_node(self, node: Node) -> None:
        log = open(node.log, "ab")  # noqa: SIM115
        env = {key: value for key, value in os.environ.items() if not key.startswith("PATRONI")}
        node.process = subprocess.Popen(
            run_as(self._user, [_bin("patroni"), str(node.config)]),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.work,
            start_new_session=True,  # a process group to kill as one (lose_node)
        )
        log.close()

    def _start_haproxy(self) -> None:
        self.haproxy_port = free_port()
        servers = "\n".join(
            f"    server {node.name} 127.0.0.1:{node.pg_port} maxconn 200 check port "
            f"{node.api_port}"
            for node in self.nodes
        )
        config = self.work / "haproxy.cfg"
        config.write_text(
            f"""global
    maxconn 1000

defaults
    mode tcp
    retries 2
    timeout client 30m
    timeout server 30m
    timeout connect 2s
    timeout check 1s

listen primary
    bind 127.0.0.1:{self.haproxy_port}
    option httpchk OPTIONS /primary
    http-check expect status 200
    default-server inter 1s fall 2 rise 1 on-marked-down shutdown-sessions
{servers}
"""
        )
        log = open(self.work / "haproxy.log", "wb")  # noqa: SIM115
        self.haproxy = subprocess.Popen(
            [_bin("haproxy"), "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        assert wait_until(self._haproxy_routes, 30), self.logs()
        # HAProxy starts every server as up; the replica is out after its failed checks.
        assert wait_until(self.routes_to_primary, 30), self.logs()

    def routes_to_primary(self) -> bool:
        """Several connections through HAProxy in a row all land on the primary."""

        async def check() -> bool:
            import asyncpg

            for _ in range(4):
                try:
                    conn = await asyncpg.connect(self.dsn(), timeout=2)
                except (OSError, asyncpg.PostgresError, TimeoutError):
                    return False
                try:
                    if await conn.fetchval("SELECT pg_is_in_recovery()"):
                        return False
                finally:
                    await conn.close()
            return True

        return run_coroutine(check)

    def _haproxy_routes(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.haproxy_port), timeout=1) as sock:
                # An SSLRequest: PostgreSQL answers one byte ('N' without TLS).
                sock.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")
                return sock.recv(1) in (b"N", b"S")
        except OSError:
            return False

    @staticmethod
    def _stop(process: subprocess.Popen[bytes] | None) -> None:
        if process is not None:
            stop(process, 20)


def _children(pid: int) -> list[int]:
    try:
        return list(map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split()))
    except OSError:
        return []


def _kill_postgres(postmaster: int) -> None:
    """SIGKILL to the postmaster and its children at once, as when the machine or container
    goes (a backend whose postmaster died would otherwise serve on until it notices)."""
    for pid in [postmaster, *_children(postmaster)]:
        _kill(pid, signal.SIGKILL)


def _kill(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _bin(name: str) -> str:
    path = shutil.which(name, path=_search_path())
    if path is None:
        raise RuntimeError(f"{name} is not installed (scripts/setup.sh installs it)")
    return path
