"""Run what the chart renders as real processes on loopback. Only what a cluster provides is
substituted: service hostnames and ports become loopback addresses, volume mounts become
directories, and the downward API gets a pod name and the CPU limit."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.processes import hand_over, unprivileged_user, wait_for_port
from tests.support.helm import Rendered

ROOT = Path(__file__).resolve().parents[2]


def entrypoint() -> list[str]:
    """The image's ENTRYPOINT, with its executable taken from this checkout's venv."""
    text = (ROOT / "Dockerfile").read_text()
    match = re.search(r"^ENTRYPOINT\s+(\[.*\])", text, re.MULTILINE)
    assert match, "Dockerfile has no exec-form ENTRYPOINT"
    command: list[str] = json.loads(match.group(1))
    return [str(Path(sys.executable).parent / command[0]), *command[1:]]


def base_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH")
    return {k: v for k, v in os.environ.items() if k in keep}


class Cluster:
    """Resolves env the way the kubelet does, for the objects of one render."""

    def __init__(self, rendered: Rendered, rewrites: dict[str, str], cpu_limit: str) -> None:
        self.rendered = rendered
        self.rewrites = rewrites
        self.cpu_limit = cpu_limit

    def secret(self, name: str, key: str) -> str:
        secret = self.rendered.get("Secret", name)
        if key in secret.get("stringData", {}):
            return str(secret["stringData"][key])
        return base64.b64decode(secret["data"][key]).decode()

    def env(self, container: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            config = self.rendered.get("ConfigMap", source["configMapRef"]["name"])
            env.update({k: str(v) for k, v in config["data"].items()})
        fields = {
            "metadata.name": "demo-pod-0",
            "metadata.namespace": "apps",
            "spec.nodeName": "node-1",
            "status.podIP": "10.1.2.3",
        }
        for item in container.get("env", []):
            if "value" in item:
                value = re.sub(
                    r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), str(item["value"])
                )
            elif "secretKeyRef" in item["valueFrom"]:
                ref = item["valueFrom"]["secretKeyRef"]
                value = self.secret(ref["name"], ref["key"])
            elif "fieldRef" in item["valueFrom"]:
                value = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
            else:
                ref = item["valueFrom"]["resourceFieldRef"]
                assert ref["resource"] == "limits.cpu" and ref["divisor"] == "1"
                value = str(math.ceil(float(self.cpu_limit)))
            env[item["name"]] = value
        return {k: self.rewrite(v) for k, v in env.items()}

    def rewrite(self, text: str) -> str:
        for old, new in self.rewrites.items():
            text = text.replace(old, new)
        return text


def _secret_keys(secret: dict[str, Any]) -> list[str]:
    return [*secret.get("stringData", {}), *secret.get("data", {})]


@dataclass
class RenderedPgBouncer:
    """The chart's PgBouncer container (its command, its rendered pgbouncer.ini) as a process
    on `port`, with `binary` as the `pgbouncer` on PATH. Restartable, like a pod."""

    cluster: Cluster
    binary: str
    work_dir: Path
    port: int
    name: str = "pgbouncer"
    process: subprocess.Popen[bytes] | None = None
    _argv: list[str] = field(default_factory=list)
    _env: dict[str, str] = field(default_factory=dict)

    def prepare(self) -> RenderedPgBouncer:
        etc = self.work_dir / f"etc-{self.name}"
        run = self.work_dir / f"run-{self.name}"
        bin_dir = self.work_dir / f"bin-{self.name}"
        for directory in (etc, run, bin_dir):
            directory.mkdir(parents=True, exist_ok=True)
        deployment = self.cluster.rendered.one("Deployment", "pgbouncer")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        secret = deployment["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"]
        # The config volume: every key of the rendered Secret, as the kubelet mounts it.
        for key in _secret_keys(self.cluster.rendered.get("Secret", secret)):
            text = self.cluster.rewrite(self.cluster.secret(secret, key))
            text = text.replace("/var/run/pgbouncer", str(run)).replace("/etc/pgbouncer", str(etc))
            if key == "pgbouncer.ini":
                text = re.sub(r"listen_port = \d+", f"listen_port = {self.port}", text)
                text += f"logfile = {self.work_dir / (self.name + '.log')}\n"
            (etc / key).write_text(text)
        # The container runs as uid 70; as root here, PgBouncer must be told whom to become.
        user = unprivileged_user()
        drop = f"-u {user} " if user else ""
        shim = bin_dir / "pgbouncer"
        shim.write_text(f'#!/bin/sh\nexec "{self.binary}" {drop}"$@"\n')
        shim.chmod(0o755)
        hand_over(self.work_dir, user)
        self.work_dir.chmod(0o755)
        env = {**base_env(), **self.cluster.env(container)}
        env["PATH"] = f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"
        script = self.cluster.rewrite(container["args"][0])
        self._argv = [*container["command"], script.replace("/etc/pgbouncer", str(etc))]
        self._argv[-1] = self._argv[-1].replace("/var/run/pgbouncer", str(run))
        self._env = env
        return self

    def start(self) -> RenderedPgBouncer:
        log = (self.work_dir / f"{self.name}.out").open("ab")
        self.process = subprocess.Popen(self._argv, env=self._env, stdout=log, stderr=log)
        log.close()
        try:
            wait_for_port(self.port, 10, self.process)
        except (RuntimeError, TimeoutError) as error:
            raise AssertionError(self.log()) from error
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def log(self) -> str:
        parts = [self.work_dir / f"{self.name}.out", self.work_dir / f"{self.name}.log"]
        return "\n".join(p.read_text(errors="replace") for p in parts if p.exists())


DB_HOST = "db.example.internal"


def external_database_cluster(
    pg_port: int,
    database: str,
    user: str,
    password: str,
    bouncer_port: int,
    work_dir: Path,
    *sets: str,
) -> Cluster:
    """Render the chart for an external database (as a platform engineer would) and map its
    service names onto loopback: Postgres on `pg_port`, PgBouncer on `bouncer_port`."""
    from tests.support.helm import render

    rendered = render(
        None,
        "postgresql.enabled=false",
        f"externalDatabase.host={DB_HOST}",
        f"externalDatabase.database={database}",
        f"externalDatabase.user={user}",
        f"externalDatabase.password={password}",
        "externalDatabase.sslmode=disable",
        "resources.limits.cpu=2",
        *sets,
    )
    metrics_dir = work_dir / "metrics"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    return Cluster(
        rendered,
        {
            f"{DB_HOST} port=5432": f"127.0.0.1 port={pg_port}",
            f"{DB_HOST}:5432": f"127.0.0.1:{pg_port}",
            "demo-itemstream-pgbouncer:6432": f"127.0.0.1:{bouncer_port}",
            "listen_addr = 0.0.0.0": "listen_addr = 127.0.0.1",
            "/var/run/itemstream/metrics": str(metrics_dir),
        },
        cpu_limit="2",
    )


def start_api(cluster: Cluster, work_dir: Path, app_port: int) -> subprocess.Popen[bytes]:
    """The api container (gunicorn, its rendered env) as a process serving on `app_port`."""
    api = cluster.rendered.one("Deployment", "api")["spec"]["template"]["spec"]["containers"][0]
    env = {**base_env(), **cluster.env(api), "HOST": "127.0.0.1", "PORT": str(app_port)}
    env.pop("METRICS_PORT", None)  # /metrics on the app port: one port less to find
    log = (work_dir / "app.log").open("ab")
    process = subprocess.Popen(
        [*entrypoint(), *api["args"]], env=env, cwd=work_dir, stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    return process


def answers_ready(base: str) -> bool:
    """The service at `base` says it is ready (its readiness probe)."""
    import httpx

    try:
        return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
