"""A Redis Sentinel rig on loopback, from Debian's packages (redis-server, redis-sentinel):
a primary, a replica, and three Sentinels (quorum 2) watching them, the layout Redis's
Sentinel documentation starts from. tests/test_redis_failover.py kills the primary under load.

The Sentinels' timings are low for a test: a primary that does not answer for
DOWN_AFTER_MS is subjectively down, and once two Sentinels agree the replica is promoted
(failover-timeout bounds a stuck attempt). Production's defaults are 30 s and 3 min.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import redis

from harness.processes import free_port, wait_for_port, wait_until

SERVICE = "itemstream"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000
QUORUM = 2


def available() -> str | None:
    """Why the rig cannot run here, or None."""
    for binary in ("redis-server", "redis-sentinel"):
        if shutil.which(binary) is None:
            return f"{binary} is not installed (apt-get install redis-server redis-sentinel)"
    return None


def redis_server_argv(port: int, work: Path) -> list[str]:
    """A throwaway redis-server on loopback: no persistence, its files in `work`."""
    binary = shutil.which("redis-server") or "redis-server"
    return [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(work),
    ]


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]


class SentinelRig:
    def __init__(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="itemstream-sentinel-"))
        self.servers: list[RedisServer] = []
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self.sentinel_ports: list[int] = []

    def url(self, db: int = 0) -> str:
        """REDIS_URL as the app reads it: the Sentinels, then the service."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/{db}"

    def start(self) -> SentinelRig:
        primary = self._start_server(replica_of=None)
        self._start_server(replica_of=primary.port)
        assert wait_until(self._replica_in_sync, 20), self.logs()
        for _ in range(3):
            self._start_sentinel(primary.port)
        assert wait_until(self._sentinels_know_each_other, 30), self.logs()
        return self

    def close(self) -> None:
        for process in [*self.sentinels, *(server.process for server in self.servers)]:
            if process.poll() is None:
                process.kill()
                process.wait(5)
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> SentinelRig:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- what the Sentinels say -------------------------------------------------------------

    def primary_port(self) -> int | None:
        """The primary's port as a majority of the Sentinels report it."""
        votes: dict[int, int] = {}
        for port in self.sentinel_ports:
            try:
                with redis.Redis(port=port, socket_timeout=0.5) as sentinel:
                    address = sentinel.sentinel_get_master_addr_by_name(SERVICE)
            except redis.RedisError:
                continue
            if address:
                votes[int(address[1])] = votes.get(int(address[1]), 0) + 1
        best = max(votes.items(), key=lambda item: item[1], default=None)
        return best[0] if best is not None and best[1] >= QUORUM else None

    def role(self, port: int) -> str | None:
        try:
            with redis.Redis(port=port, socket_timeout=0.5) as client:
                return str(client.info("replication")["role"])
        except redis.RedisError:
            return None

    def kill_primary(self) -> int:
        """SIGKILL to the primary's process, as when its node goes; its port."""
        port = self.primary_port()
        assert port is not None, "no primary to kill"
        server = next(s for s in self.servers if s.port == port)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(5)
        return port

    def promoted(self, lost: int) -> bool:
        """A Sentinel majority names another primary, and that server says it is one."""
        port = self.primary_port()
        return port is not None and port != lost and self.role(port) == "master"

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}"
            for path in sorted(self.work.glob("*.log"))
        )

    # -- processes --------------------------------------------------------------------------

    def _start_server(self, replica_of: int | None) -> RedisServer:
        port = free_port()
        argv = [
            *redis_server_argv(port, self.work),
            "--logfile",
            str(self.work / f"redis-{port}.log"),
        ]
        if replica_of is not None:
            argv += ["--replicaof", "127.0.0.1", str(replica_of)]
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for_port(port, 15, process)
        server = RedisServer(port, process)
        self.servers.append(server)
        return server

    def _replica_in_sync(self) -> bool:
        replica = self.servers[-1].port
        try:
            with redis.Redis(port=replica, socket_timeout=0.5) as client:
                return str(client.info("replication").get("master_link_status")) == "up"
        except redis.RedisError:
            return False

    def _start_sentinel(self, primary: int) -> None:
        port = free_port()
        config = self.work / f"sentinel-{port}.conf"
        # Sentinel rewrites its configuration file as it learns: one file per Sentinel.
        config.write_text(
            "\n".join(
                [
                    f"port {port}",
                    "bind 127.0.0.1",
                    f"dir {self.work}",
                    f"logfile {self.work / f'sentinel-{port}.log'}",
                    f"sentinel monitor {SERVICE} 127.0.0.1 {primary} {QUORUM}",
                    f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
                    f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}",
                    f"sentinel parallel-syncs {SERVICE} 1",
                    "",
                ]
            )
        )
        process = subprocess.Popen(
            [shutil.which("redis-sentinel") or "redis-sentinel", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(port, 15, process)
        self.sentinels.append(process)
        self.sentinel_ports.append(port)

    def _sentinels_know_each_other(self) -> bool:
        """Each Sentinel sees the other two and the replica: a failover can be agreed on."""
        for port in self.sentinel_ports:
            try:
                with redis.Redis(port=port, socket_timeout=0.5) as sentinel:
                    state = sentinel.sentinel_master(SERVICE)
            except redis.RedisError:
                return False
            if int(state.get("num-other-sentinels", 0)) < len(self.sentinel_ports) - 1:
                return False
            if int(state.get("num-slaves", 0)) < 1:
                return False
        return True
