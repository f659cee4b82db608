"""Run what the chart renders: the PgBouncer container's command with its rendered config, the
migration Job's command, the app's init container and main container, each as a real
process with the environment resolved from the rendered ConfigMaps and Secrets, against real
PostgreSQL on loopback. Only what a cluster provides is substituted: service hostnames and
ports become loopback addresses, volume mounts become temporary directories, and the
downward API gets a pod name and the CPU limit."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.helm import Rendered, render
from tests.support.pgbouncer import MODERN, find_binary
from tests.support.postgres import PostgresServer
from tests.support.processes import (
    free_port,
    hand_over,
    missing,
    stop,
    unprivileged_user,
    wait_for_port,
    wait_until,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
DB_HOST = "db.example.internal"
PASSWORD = 'chart "pw" 1'  # a quote, to prove the userlist escaping


def entrypoint() -> list[str]:
    """The image's ENTRYPOINT, with its executable taken from this checkout's venv."""
    text = (ROOT / "Dockerfile").read_text()
    match = re.search(r"^ENTRYPOINT\s+(\[.*\])", text, re.MULTILINE)
    assert match, "Dockerfile has no exec-form ENTRYPOINT"
    command: list[str] = json.loads(match.group(1))
    return [str(Path(sys.executable).parent / command[0]), *command[1:]]


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


def base_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH")
    return {k: v for k, v in os.environ.items() if k in keep}


@pytest.fixture
def work_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: PgBouncer runs as an unprivileged user when we are root, and
    # pytest's base directory is private to root.
    path = Path(tempfile.mkdtemp(prefix="itemstream-chart-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_rendered_objects_run(pg: PostgresServer, work_dir: Path) -> None:
    tmp_path = work_dir
    binary = find_binary(MODERN)
    if binary is None:
        missing("no modern PgBouncer (>= 1.21); run `make test`")
    assert binary is not None
    database = pg.create_database("itemstream_chart")
    rendered = render(
        None,
        "postgresql.enabled=false",
        f"externalDatabase.host={DB_HOST}",
        f"externalDatabase.database={database}",
        f"externalDatabase.user={pg.admin_url.username}",
        f"externalDatabase.password={PASSWORD}",
        "externalDatabase.sslmode=disable",
        "resources.limits.cpu=2",
    )
    bouncer_port, app_port, metrics_port = free_port(), free_port(), free_port()
    etc, run = tmp_path / "etc-pgbouncer", tmp_path / "run-pgbouncer"
    etc.mkdir()
    run.mkdir()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    cluster = Cluster(
        rendered,
        {
            f"{DB_HOST} port=5432": f"127.0.0.1 port={pg.port}",
            f"{DB_HOST}:5432": f"127.0.0.1:{pg.port}",
            "demo-itemstream-pgbouncer:6432": f"127.0.0.1:{bouncer_port}",
            "listen_addr = 0.0.0.0": "listen_addr = 127.0.0.1",
            "listen_port = 6432": f"listen_port = {bouncer_port}",
            "/etc/pgbouncer": str(etc),
            "/var/run/pgbouncer": str(run),
            "/var/run/itemstream/metrics": str(metrics_dir),
        },
        cpu_limit="2",
    )
    processes: list[subprocess.Popen[bytes]] = []
    try:
        # --- PgBouncer: its rendered config and its container command -------------------
        deployment = rendered.one("Deployment", "pgbouncer")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        ini = cluster.secret("demo-itemstream-pgbouncer", "pgbouncer.ini")
        (etc / "pgbouncer.ini").write_text(cluster.rewrite(ini))
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        # `pgbouncer` on PATH, as in the image. The container runs as uid 70; as root here,
        # PgBouncer must be told whom to become.
        user = unprivileged_user()
        drop = f"-u {user} " if user else ""
        shim = bin_dir / "pgbouncer"
        shim.write_text(f'#!/bin/sh\nexec "{binary}" {drop}"$@"\n')
        shim.chmod(0o755)
        hand_over(tmp_path, user)
        tmp_path.chmod(0o755)
        env = {**base_env(), **cluster.env(container)}
        env["PATH"] = f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"
        argv = [*container["command"], cluster.rewrite(container["args"][0])]
        log = (tmp_path / "pgbouncer.log").open("wb")
        bouncer = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
        processes.append(bouncer)
        try:
            wait_for_port(bouncer_port, 10, bouncer)
        except (RuntimeError, TimeoutError) as error:
            raise AssertionError((tmp_path / "pgbouncer.log").read_text()) from error
        userlist = (run / "userlist.txt").read_text()
        assert userlist == f'"{pg.admin_url.username}" "chart ""pw"" 1"\n'

        # --- the migration Job (a pre-install hook with its own hook Secret) -------------
        job = rendered.one("Job", "migrate")
        job_container = job["spec"]["template"]["spec"]["containers"][0]
        job_env = {**base_env(), **cluster.env(job_container)}
        migrated = subprocess.run(
            [*entrypoint(), *job_container["args"]],
            env=job_env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr

        # --- the app pod: init container, then the main container ------------------------
        pod = rendered.one("Deployment", "api")["spec"]["template"]["spec"]
        (init,) = pod["initContainers"]
        waited = subprocess.run(
            [*entrypoint(), *init["args"]],
            env={**base_env(), **cluster.env(init)},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert waited.returncode == 0, waited.stdout + waited.stderr

        api = pod["containers"][0]
        app_env = {**base_env(), **cluster.env(api)}
        assert app_env["WEB_CONCURRENCY"] == "2"
        assert app_env["DATABASE_PASSWORD"] == PASSWORD
        ports = {p["name"]: p["containerPort"] for p in api["ports"]}
        # Container ports become free loopback ports (like hostnames); HOST likewise.
        app_env.update(HOST="127.0.0.1", PORT=str(app_port), METRICS_PORT=str(metrics_port))
        local = {ports["http"]: app_port, ports["metrics"]: metrics_port}
        app_log = (tmp_path / "app.log").open("wb")
        app = subprocess.Popen(
            [*entrypoint(), *api["args"]],
            env=app_env,
            cwd=tmp_path,
            stdout=app_log,
            stderr=subprocess.STDOUT,
        )
        processes.append(app)

        def probe(kind: str) -> int:
            get = api[kind]["httpGet"]
            port = local[ports[get["port"]]]
            try:
                return httpx.get(f"http://127.0.0.1:{port}{get['path']}", timeout=2).status_code
            except httpx.HTTPError:
                return 0

        assert wait_until(lambda: probe("startupProbe") == 200, 60), (
            tmp_path / "app.log"
        ).read_text()
        assert wait_until(lambda: probe("readinessProbe") == 200, 20), (
            tmp_path / "app.log"
        ).read_text()
        assert probe("livenessProbe") == 200
        base = f"http://127.0.0.1:{app_port}"
        created = httpx.post(f"{base}/v1/items", json={"name": "from the chart", "price": 1})
        assert created.status_code == 201, created.text
        assert httpx.get(f"{base}{created.headers['location']}").status_code == 200
        scrape = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert "itemstream_db_pool_acquire_seconds_count" in scrape
        output = (tmp_path / "app.log").read_text()
        assert output.count("Booting worker") == 2, output[-2000:]
        app.send_signal(signal.SIGTERM)
        assert app.wait(60) == 0, (tmp_path / "app.log").read_text()[-3000:]
    finally:
        for process in reversed(processes):
            stop(process)
        pg.drop_database(database)
