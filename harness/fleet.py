"""A fleet on loopback, as a cluster runs the service: several app instances (gunicorn, each
with its own metrics port, like pods), HAProxy in front as the Service (round robin, a server
taken out when its `/readyz` fails twice, as a readiness probe does), and a real Prometheus
(Debian's) scraping every instance with the chart's recording rules and alerts, every second;
with observability on, also a PgBouncer exporter (Spreaker's, from PyPI: the same
`pgbouncer_pools_*` gauges as the chart's sidecar, which is a Go binary that cannot be
fetched here) scraped beside them, and an OTLP/HTTP receiver (harness.otlp) that every
instance sends its traces to, each with the resource attributes the chart gives a pod.

The scrape adds the labels a ServiceMonitor gives (`namespace`, `job`, `pod`), so the chart's
rules and the dashboard's queries run unchanged. `make fleet` starts one by hand
(scripts/fleet.py); tests/test_fleet.py kills instances under load and queries Prometheus.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from harness.otlp import OtlpReceiver
from harness.processes import (
    cpu_seconds,
    free_port,
    stop,
    stop_group,
    wait_for_port,
    wait_until,
    worker_pids,
)

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "apps"
JOB = "itemstream"  # the Service's name, which a ServiceMonitor's scrape uses as the job
PROMETHEUS_CACHE = Path.home() / ".cache/itemstream/promtool/usr/bin"  # scripts/setup.sh
# The exporter's own pins (psycopg2 2.8.5, prometheus_client 0.8.0) predate Python 3.11:
# scripts/setup.sh installs it without them, with these, in a virtual environment of its own.
PGBOUNCER_EXPORTER = "prometheus-pgbouncer-exporter==2.1.2"
PGBOUNCER_EXPORTER_DEPS = (
    "psycopg2-binary==2.9.13",
    "prometheus_client==0.26.0",
    "python-json-logger==4.2.0",
    "PyYAML==6.0.4",
)


def exporter_dir() -> Path:
    version = PGBOUNCER_EXPORTER.split("==")[1]
    return Path.home() / f".cache/itemstream/pgbouncer-exporter-{version}"


def exporter_binary() -> str | None:
    binary = exporter_dir() / "bin" / "pgbouncer-exporter"
    return str(binary) if binary.exists() else None


def chart_rules(
    helm: str, release: str = JOB, namespace: str = NAMESPACE, sets: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The spec of the chart's PrometheusRule (its rule groups), as Helm renders it: the same
    file a cluster's Prometheus loads (with `sets`, values such as a shorter `for`)."""
    out = subprocess.run(
        [
            helm,
            "template",
            release,
            str(ROOT / "chart"),
            "-n",
            namespace,
            "-f",
            str(ROOT / "chart" / "ci" / "try-out-values.yaml"),
            "--set",
            "prometheusRule.enabled=true",
            *[arg for value in sets for arg in ("--set", value)],
            "--show-only",
            "templates/prometheusrule.yaml",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    spec: dict[str, Any] = yaml.safe_load(out)["spec"]
    return spec


def _ready(port: int) -> bool:
    """Whether /readyz on `port` answers 200 (as a readiness probe asks)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:  # refused, reset, or an HTTP error status
        return False


def available() -> str | None:
    """Why the fleet cannot run here, or None."""
    if shutil.which("haproxy") is None:
        return "haproxy is not installed (scripts/setup.sh installs it)"
    if prometheus_binary() is None:
        return "no prometheus binary (scripts/setup.sh unpacks Debian's)"
    if exporter_binary() is None:
        return f"no PgBouncer exporter in {exporter_dir()} (scripts/setup.sh installs it)"
    return None


def prometheus_binary() -> str | None:
    path = os.pathsep.join([str(PROMETHEUS_CACHE), os.environ.get("PATH", "")])
    return shutil.which("prometheus", path=path)


@dataclass
class Instance:
    name: str
    port: int
    metrics_port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None
    tree: Path = ROOT  # the release it runs: this checkout, or an earlier one's worktree
    env: dict[str, str] = field(default_factory=dict)  # its own settings over the fleet's

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def cpu_seconds(self) -> float:
        """CPU time of the instance's master and live workers (what a pod's cgroup counts,
        less the workers that already exited)."""
        if self.process is None or self.process.poll() is not None:
            return 0.0
        return sum(cpu_seconds(p) for p in [self.process.pid, *worker_pids(self.process.pid)])


@dataclass
class Fleet:
    env: dict[str, str]
    size: int = 3
    rules: dict[str, Any] | None = None  # the PrometheusRule's spec (its groups)
    tree: Path = ROOT  # the release the instances start on
    # PgBouncer's address (host:port), scraped through the exporter when rules are given.
    bouncer: str | None = None
    work: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="itemstream-fleet-")))
    instances: list[Instance] = field(default_factory=list)
    port: int = 0
    prometheus_port: int = 0
    _haproxy: subprocess.Popen[bytes] | None = None
    _prometheus: subprocess.Popen[bytes] | None = None
    _exporter: subprocess.Popen[bytes] | None = None
    exporter_port: int = 0
    traces: OtlpReceiver | None = None  # what the instances exported (with rules given)

    @property
    def base(self) -> str:
        """Where clients reach the fleet: the Service."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Fleet:
        if self.rules is not None:
            self.traces = OtlpReceiver().start()
        for index in range(self.size):
            instance = Instance(
                f"fleet-{index}",
                free_port(),
                free_port(),
                self.work / f"fleet-{index}.log",
                tree=self.tree,
            )
            self.instances.append(instance)
            self.start_instance(instance)
        for instance in self.instances:
            # Ready before it gets traffic, as a readiness probe gates a pod: HAProxy counts
            # a server up until its checks fail, and would answer 503 meanwhile.
            self.wait_ready(instance)
        self._start_haproxy()
        if self.rules is not None:
            if self.bouncer is not None:
                self._start_exporter(self.bouncer)
            self._start_prometheus()
        return self

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        # All at once, as a namespace deletion would: each may drain streams for a while.
        with ThreadPoolExecutor(max_workers=max(1, len(self.instances))) as pool:
            list(pool.map(self.stop, self.instances))
        for process in (self._haproxy, self._prometheus, self._exporter):
            if process is not None:
                stop(process)
        if self.traces is not None:
            self.traces.close()
        shutil.rmtree(self.work, ignore_errors=True)

    # -- instances --------------------------------------------------------------------------

    def start_instance(self, instance: Instance) -> None:
        env = {
            **self.env,
            **instance.env,
            "HOST": "127.0.0.1",
            "PORT": str(instance.port),
            "METRICS_PORT": str(instance.metrics_port),
            "PYTHONPATH": str(instance.tree),
        }
        if self.traces is not None:
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = self.traces.endpoint
            # What the chart's Deployment sets from the downward API.
            env["OTEL_RESOURCE_ATTRIBUTES"] = (
                f"k8s.pod.name={instance.name},k8s.namespace.name={NAMESPACE}"
            )
        with instance.log.open("ab") as log:
            instance.process = subprocess.Popen(
                [sys.executable, "-m", "app", "serve"],
                cwd=instance.tree,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its workers die with it (kill)
            )

    def kill(self, instance: Instance) -> None:
        """SIGKILL to the instance's master and workers at once, as when a node goes."""
        if instance.process is not None and instance.process.poll() is None:
            os.killpg(instance.process.pid, signal.SIGKILL)
            instance.process.wait(10)

    def stop(self, instance: Instance, timeout: float = 30) -> None:
        if instance.process is not None:
            stop_group(instance.process, timeout)

    def ready(self, instance: Instance) -> bool:
        return _ready(instance.port)

    def wait_ready(self, instance: Instance, timeout: float = 60) -> None:
        wait_for_port(instance.port, timeout, instance.process)
        assert wait_until(partial(self.ready, instance), timeout), instance.output()[-3000:]

    def replace(
        self,
        instance: Instance,
        tree: Path,
        pre_stop: float,
        grace: float = 30,
        env: dict[str, str] | None = None,
    ) -> dict[str, float]:
        """A rolling update's step for one pod, as the chart's timings run it: its endpoint
        goes (HAProxy drains it: no new requests, the open ones go on) while preStop sleeps,
        then SIGTERM (gunicorn's graceful shutdown, open streams drained) with SIGKILL after
        the rest of the `grace` period, then the new release (with `env` over the fleet's
        settings) starts on the same ports and takes requests once `/readyz` answers.
        Returns the seconds of each phase and the moment of the SIGTERM (`sigterm_at`,
        time.monotonic())."""
        started = time.monotonic()
        self.set_state(instance, "drain")
        time.sleep(pre_stop)
        stopping = time.monotonic()
        self.stop(instance, timeout=grace - pre_stop)
        stopped = time.monotonic()
        instance.tree = tree
        instance.env = dict(env or {})
        self.start_instance(instance)
        self.wait_ready(instance)
        self.set_state(instance, "ready")
        return {
            "sigterm_at": stopping,
            "pre_stop": stopping - started,
            "shutdown": stopped - stopping,
            "start": time.monotonic() - stopped,
        }

    def set_state(self, instance: Instance, state: str) -> None:
        """HAProxy's runtime API: `drain` (an endpoint removed), `ready` (added back)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as admin:
            admin.settimeout(5)
            admin.connect(str(self.work / "haproxy.sock"))
            admin.sendall(f"set server pods/{instance.name} state {state}\n".encode())
            answer = admin.recv(4096).decode().strip()
        assert not answer, f"haproxy: {answer}"

    # -- the Service ------------------------------------------------------------------------

    def _start_haproxy(self) -> None:
        self.port = free_port()
        servers = "\n".join(f"  server {i.name} 127.0.0.1:{i.port} check" for i in self.instances)
        config = self.work / "haproxy.cfg"
        config.write_text(
            f"""global
  maxconn 4096
  stats socket {self.work / "haproxy.sock"} mode 600 level admin
  log stderr format raw local0
defaults
  mode http
  # Abnormal endings only (a connection cut, a 5xx, a timeout), with who ended it.
  log global
  option httplog
  option dontlog-normal
  timeout connect 2s
  timeout client 180s
  timeout server 180s
  retries 2
  option redispatch
frontend service
  bind 127.0.0.1:{self.port}
  # Which instance answered: tests follow a stream to the pod it ran on.
  http-response set-header X-Served-By %[srv_name]
  default_backend pods
backend pods
  balance roundrobin
  option httpchk GET /readyz
  http-check expect status 200
  default-server inter 1s fall 2 rise 2
{servers}
"""
        )
        with (self.work / "haproxy.log").open("wb") as log:
            self._haproxy = subprocess.Popen(
                [shutil.which("haproxy") or "haproxy", "-db", "-f", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(self.port, 15, self._haproxy)
        assert wait_until(partial(_ready, self.port), 60), (self.work / "haproxy.log").read_text()

    def cut_sessions(self) -> list[str]:
        """HAProxy's log of the sessions that did not end normally (dontlog-normal)."""
        log = self.work / "haproxy.log"
        return log.read_text(errors="replace").splitlines() if log.exists() else []

    # -- Prometheus -------------------------------------------------------------------------

    def _start_prometheus(self) -> None:
        binary = prometheus_binary()
        assert binary is not None, "no prometheus binary"
        self.prometheus_port = free_port()
        rules = self.work / "rules.yaml"
        rules.write_text(yaml.safe_dump(self.rules))
        targets = [
            {
                "targets": [f"127.0.0.1:{i.metrics_port}"],
                "labels": {"namespace": NAMESPACE, "pod": i.name},
            }
            for i in self.instances
        ]
        jobs: list[dict[str, Any]] = [{"job_name": JOB, "static_configs": targets}]
        if self._exporter is not None:
            jobs.append(
                {
                    "job_name": f"{JOB}-pgbouncer",
                    "static_configs": [
                        {
                            "targets": [f"127.0.0.1:{self.exporter_port}"],
                            "labels": {"namespace": NAMESPACE, "pod": "pgbouncer-0"},
                        }
                    ],
                }
            )
        expected = sum(len(c["targets"]) for job in jobs for c in job["static_configs"])
        config = self.work / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(rules)],
                    "scrape_configs": jobs,
                }
            )
        )
        with (self.work / "prometheus.log").open("wb") as log:
            self._prometheus = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.work / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.prometheus_port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(self.prometheus_port, 30, self._prometheus)

        def all_up() -> bool:
            try:
                return len(self.targets_up()) == expected
            except OSError:  # 503 while its storage opens, or not listening yet
                return False

        assert wait_until(all_up, 30), self.logs()

    def _start_exporter(self, bouncer: str) -> None:
        binary = exporter_binary()
        assert binary is not None, "no PgBouncer exporter"
        self.exporter_port = free_port()
        config = self.work / "pgbouncer-exporter.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "exporter_host": "127.0.0.1",
                    "exporter_port": self.exporter_port,
                    "pgbouncers": [
                        {
                            "dsn": f"postgresql://postgres@{bouncer}/pgbouncer",
                            "exclude_databases": ["pgbouncer"],
                        }
                    ],
                }
            )
        )
        with (self.work / "pgbouncer-exporter.log").open("wb") as log:
            self._exporter = subprocess.Popen(
                [binary, "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_for_port(self.exporter_port, 30, self._exporter)

    def _api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        url = f"http://127.0.0.1:{self.prometheus_port}/api/v1/{path}?{query}"
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = json.loads(answer.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result (a vector), as Grafana's panels ask it."""
        data = self._api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step: float = 1) -> list[Any]:
        """A range query's result (a matrix): one series per label set, [time, value] pairs."""
        data = self._api("query_range", query=expr, start=str(start), end=str(end), step=str(step))
        result: list[Any] = data["result"]
        return result

    def series(self, match: str) -> list[dict[str, str]]:
        """The label sets of the series a selector matches (what prometheus-adapter lists)."""
        found: list[dict[str, str]] = self._api("series", **{"match[]": match})
        return found

    def alerts(self) -> list[dict[str, Any]]:
        """Alerts pending or firing now."""
        alerts: list[dict[str, Any]] = self._api("alerts")["alerts"]
        return alerts

    def rule_health(self) -> list[str]:
        """Rules Prometheus could not evaluate, with the error."""
        problems = []
        for group in self._api("rules")["groups"]:
            for rule in group["rules"]:
                if rule.get("health") not in ("ok", "unknown"):
                    problems.append(f"{rule['name']}: {rule.get('lastError')}")
        return problems

    def targets_up(self) -> list[str]:
        return [
            target["labels"].get("pod", "")
            for target in self._api("targets")["activeTargets"]
            if target["health"] == "up"
        ]

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}"
            for path in sorted(self.work.glob("*.log"))
        )
