"""The bench's plumbing: servers started and stopped as processes, CPU accounted per process
tree, and wrk runs parsed into `Run`s (median of rounds). Shared by bench/run.py's sections."""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from harness.processes import free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
WRK_DIR = Path(__file__).parent / "wrk"
DURATION = int(os.environ.get("BENCH_DURATION", "5"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "64"))


# --- processes and CPU accounting ----------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def tree_cpu(root: int) -> float:
    return sum(_cpu_seconds(pid) for pid in _descendants(root))


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def wait_ready(server: Server, timeout: float = 60) -> float:
    started = time.monotonic()

    def ready() -> bool:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}")
        try:
            return httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    if not wait_until(ready, timeout, interval=0.02):
        raise TimeoutError(f"{server.name} not ready after {timeout}s")
    return time.monotonic() - started


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            server.proc.kill()


@contextmanager
def running(name: str, argv: list[str], env: dict[str, str]) -> Iterator[Server]:
    port = free_port()
    proc = subprocess.Popen(
        [*argv, "--bind", f"127.0.0.1:{port}"]
        if "gunicorn" in argv
        else [*argv, "--port", str(port)],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = Server(name, port, proc)
    try:
        wait_ready(server)
        yield server
    finally:
        stop_server(server)


def gunicorn(app: str, workers: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "-k",
        "uvicorn_worker.UvicornWorker",
        "-w",
        str(workers),
        "--keep-alive",
        "75",
        app,
    ]


def itemstream(workers: int) -> list[str]:
    return [sys.executable, "-m", "app", "serve", "--workers", str(workers)]


# --- wrk -------------------------------------------------------------------------------------


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int
    cpu: dict[str, float] = field(default_factory=dict)  # cores used, by component


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


@dataclass
class Load:
    """A wrk process started by `start_wrk`; `finish` waits for it and parses its report."""

    url: str
    proc: subprocess.Popen[bytes]
    started: float
    before: dict[str, float]
    cpu_roots: dict[str, int]

    def finish(self) -> Run:
        assert self.proc.stdout is not None
        output = self.proc.stdout.read().decode()
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.monotonic() - self.started
        cpu = {
            name: (tree_cpu(pid) - self.before[name]) / elapsed
            for name, pid in self.cpu_roots.items()
        }
        cpu["wrk"] = (usage.ru_utime + usage.ru_stime) / elapsed
        if self.proc.returncode != 0:
            raise RuntimeError(f"wrk failed: {output}")
        return parse_wrk(self.url, output, cpu)


def start_wrk(
    url: str,
    script: str | None,
    ids_file: Path,
    cpu_roots: dict[str, int],
    *,
    connections: int = CONNECTIONS,
    duration: float = DURATION,
    headers: dict[str, str] | None = None,
) -> Load:
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "5s"]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    if script:
        argv += ["-s", str(WRK_DIR / script)]
    before = {name: tree_cpu(pid) for name, pid in cpu_roots.items()}
    proc = subprocess.Popen(
        [*argv, url],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "BENCH_IDS": str(ids_file)},
    )
    return Load(url, proc, time.monotonic(), before, cpu_roots)


def wrk(
    url: str, script: str | None, ids_file: Path, cpu_roots: dict[str, int], **options: Any
) -> Run:
    """`start_wrk` (same options) and its report."""
    return start_wrk(url, script, ids_file, cpu_roots, **options).finish()


def parse_wrk(url: str, output: str, cpu: dict[str, float]) -> Run:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    latencies = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", output, re.M))
    if "50" not in latencies or "99" not in latencies:
        raise RuntimeError(f"wrk printed no latency distribution for {url}:\n{output}")
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    errors = (int(non_2xx.group(1)) if non_2xx else 0) + (
        sum(map(int, socket.groups())) if socket else 0
    )
    return Run(rps, _ms(latencies["50"]), _ms(latencies["99"]), errors, requests, cpu)


def median_run(runs: list[Run]) -> dict[str, Any]:
    return {
        "rps": round(statistics.median(r.rps for r in runs), 1),
        "p50_ms": round(statistics.median(r.p50_ms for r in runs), 2),
        "p99_ms": round(statistics.median(r.p99_ms for r in runs), 2),
        "errors": sum(r.errors for r in runs),
        "requests": sum(r.requests for r in runs),
        "rounds": [round(r.rps, 1) for r in runs],
        "cpu_cores": {k: round(statistics.median(r.cpu[k] for r in runs), 2) for k in runs[0].cpu},
    }
