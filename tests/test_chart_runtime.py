"""Run what the chart renders: the PgBouncer container's command with its rendered config, the
migration Job's command, the app's init container and main container, each as a real
process with the environment resolved from the rendered ConfigMaps and Secrets, against real
PostgreSQL on loopback. Only what a cluster provides is substituted: service hostnames and
ports become loopback addresses, volume mounts become temporary directories, and the
downward API gets a pod name and the CPU limit."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.pgbouncer import MODERN, find_binary
from harness.postgres import PostgresServer
from harness.processes import free_port, stop, wait_until
from tests.support.chart_runtime import Cluster, RenderedPgBouncer, base_env, entrypoint
from tests.support.helm import Rendered, render
from tests.support.skips import missing

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
DB_HOST = "db.example.internal"
PASSWORD = 'chart "pw" 1'  # a quote, to prove the userlist escaping


def _exporter_dsn(rendered: Rendered) -> str:
    pod = rendered.one("Deployment", "pgbouncer")["spec"]["template"]["spec"]
    exporter = next(c for c in pod["containers"] if c["name"] == "exporter")
    flag = "--pgBouncer.connectionString="
    return str(next(a[len(flag) :] for a in exporter["args"] if a.startswith(flag)))


def _psql(dsn: str, command: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    """psql with the exporter's DSN (optionally as another user, without a password)."""
    url = httpx.URL(dsn)
    if user is not None:
        url = url.copy_with(username=user)
    return subprocess.run(
        ["psql", str(url), "-c", command],
        env={**base_env(), "PGCONNECT_TIMEOUT": "5"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _run_to_end(cluster: Cluster, container: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """A container that runs to completion (a Job's, an init container), as its pod would."""
    return subprocess.run(
        [*entrypoint(), *container["args"]],
        env={**base_env(), **cluster.env(container)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@contextmanager
def step(name: str) -> Iterator[None]:
    """One step of the run: a failure says which step it was, then what failed."""
    try:
        yield
    except AssertionError as error:
        raise AssertionError(f"step {name!r} failed: {error}") from error


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
        # A host allowlist must not lock out the probers, which send their own Host.
        "security.allowedHosts={api.example.com}",
    )
    bouncer_port, app_port, metrics_port = free_port(), free_port(), free_port()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    cluster = Cluster(
        rendered,
        {
            f"{DB_HOST} port=5432": f"127.0.0.1 port={pg.port}",
            f"{DB_HOST}:5432": f"127.0.0.1:{pg.port}",
            "demo-itemstream-pgbouncer:6432": f"127.0.0.1:{bouncer_port}",
            "listen_addr = 0.0.0.0": "listen_addr = 127.0.0.1",
            "/var/run/itemstream/metrics": str(metrics_dir),
        },
        cpu_limit="2",
    )
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with step("PgBouncer runs its rendered config; only the exporter's stats user gets in"):
            bouncer = RenderedPgBouncer(cluster, binary, tmp_path, bouncer_port).prepare().start()
            assert bouncer.process is not None
            processes.append(bouncer.process)
            userlist = (tmp_path / "run-pgbouncer" / "userlist.txt").read_text()
            assert userlist.splitlines()[0] == f'"{pg.admin_url.username}" "chart ""pw"" 1"'
            # The exporter's connection string, as rendered: the stats user, no password, SHOW only.
            dsn = _exporter_dsn(render(None, "pgbouncer.metrics.enabled=true"))
            dsn = dsn.replace("127.0.0.1:6432", f"127.0.0.1:{bouncer_port}")
            stats = _psql(dsn, "SHOW POOLS")
            assert stats.returncode == 0, stats.stderr
            assert "cl_active" in stats.stdout
            # Nobody else gets in without a password.
            assert _psql(dsn, "SHOW POOLS", user=pg.admin_url.username).returncode != 0

        # The migration Job is a pre-install hook with its own hook Secret.
        with step("the migration Job migrates"):
            job = rendered.one("Job", "migrate")
            migrated = _run_to_end(cluster, job["spec"]["template"]["spec"]["containers"][0])
            assert migrated.returncode == 0, migrated.stdout + migrated.stderr

        # The app pod: the init container, then the main container.
        with step("the init container waits for the schema"):
            pod = rendered.one("Deployment", "api")["spec"]["template"]["spec"]
            (init,) = pod["initContainers"]
            waited = _run_to_end(cluster, init)
            assert waited.returncode == 0, waited.stdout + waited.stderr

        with step("the app container starts and passes its probes"):
            api = pod["containers"][0]
            app_env = {**base_env(), **cluster.env(api)}
            # Sized by the app from its CPU limit (here: this machine's), at most MAX_WORKERS.
            assert "WEB_CONCURRENCY" not in app_env and app_env["MAX_WORKERS"] == "8"
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
                """As the kubelet does: to the pod IP, so with the pod IP as the Host."""
                get = api[kind]["httpGet"]
                port = local[ports[get["port"]]]
                url = f"http://127.0.0.1:{port}{get['path']}"
                host = f"10.1.2.3:{ports[get['port']]}"
                try:
                    return httpx.get(url, headers={"Host": host}, timeout=2).status_code
                except httpx.HTTPError:
                    return 0

            assert wait_until(lambda: probe("startupProbe") == 200, 60), (
                tmp_path / "app.log"
            ).read_text()
            assert wait_until(lambda: probe("readinessProbe") == 200, 20), (
                tmp_path / "app.log"
            ).read_text()
            assert probe("livenessProbe") == 200
        with step("helm test, the host allowlist, items and metrics, SIGTERM"):
            base = f"http://127.0.0.1:{app_port}"
            # The `helm test` pod calls the Service by name.
            (test_pod,) = rendered.of_kind("Pod")
            service_url = httpx.URL(test_pod["spec"]["containers"][0]["args"][0])
            via_service = httpx.get(
                f"{base}{service_url.path}", headers={"Host": service_url.netloc.decode()}
            )
            assert via_service.status_code == 200, via_service.text
            # Everything else keeps the allowlist.
            wrong_host = httpx.get(f"{base}/v1/items", headers={"Host": "10.1.2.3"})
            assert wrong_host.status_code == 400
            allowed = {"Host": "api.example.com"}
            created = httpx.post(
                f"{base}/v1/items", json={"name": "from the chart", "price": 1}, headers=allowed
            )
            assert created.status_code == 201, created.text
            located = httpx.get(f"{base}{created.headers['location']}", headers=allowed)
            assert located.status_code == 200
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
