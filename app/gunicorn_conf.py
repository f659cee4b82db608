"""gunicorn configuration for `itemstream serve` (loaded with `-c python:app.gunicorn_conf`).
Every value can be overridden with GUNICORN_CMD_ARGS."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from app.config import Settings
from app.telemetry.logs import logging_config
from app.workers import worker_count

_settings = Settings()
_refused, _ = _settings.unknown_variables(os.environ)  # `serve` has warned already
if _problems := _settings.serving_problems() + _refused:  # also when gunicorn is started by hand
    raise SystemExit("itemstream: invalid configuration\n  " + "\n  ".join(_problems))

bind = [f"{_settings.server.host}:{_settings.server.port}"]
worker_class = "app.gunicorn_worker.Worker"
# The embedded SQLite database takes one writer; Postgres deployments size by CPU.
workers = (
    1
    if _settings.db.is_sqlite
    else worker_count(_settings.server.web_concurrency, maximum=_settings.server.max_workers)
)
_gunicorn = _settings.server.gunicorn
timeout = _gunicorn.timeout
graceful_timeout = _gunicorn.graceful_timeout
keepalive = _gunicorn.keepalive
max_requests = _gunicorn.max_requests
max_requests_jitter = _gunicorn.effective_max_requests_jitter
# gunicorn's request limits, which its own parser applies; with uvicorn workers app.protocol
# applies them (app.gunicorn_worker reads them from here, GUNICORN_CMD_ARGS included).
_http = _settings.server.http
limit_request_line = _http.limit_request_line
limit_request_fields = _http.limit_request_fields
limit_request_field_size = _http.limit_request_field_size
# Heartbeat file on tmpfs: fchmod on a disk-backed /tmp can block the worker.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108
preload_app = False  # engines and telemetry must be created after the fork
forwarded_allow_ips = _settings.server.forwarded_allow_ips
accesslog = None  # the app writes its own access log (route template, trace id)
logconfig_dict = logging_config(_settings.telemetry.log_level, _settings.telemetry.log_format)
proc_name = "itemstream"
# The control socket (gunicorn >= 24) would need a writable home; we do not use it.
control_socket_disable = True

# Must be in the environment before any worker imports prometheus_client. In Kubernetes the
# chart points it at an emptyDir; elsewhere a private temporary directory is made and removed.
_own_metrics_dir: str | None = None
if _settings.telemetry.metrics_enabled and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _own_metrics_dir = tempfile.mkdtemp(prefix="itemstream-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _own_metrics_dir


def on_starting(server: Any) -> None:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        from app.telemetry.metrics import prepare_multiprocess_dir

        prepare_multiprocess_dir(directory)


def when_ready(server: Any) -> None:
    base = f"http://{_settings.server.host}:{_settings.server.port}"
    docs = f", docs at {base}/docs" if _settings.server.docs_enabled else ""
    server.log.info("itemstream API at %s%s", base, docs)
    if _settings.telemetry.metrics_enabled and _settings.telemetry.metrics_port is not None:
        from app.telemetry.metrics import start_metrics_server

        start_metrics_server(_settings.telemetry.metrics_port, _settings.server.host)
        server.log.info(
            "metrics on %s:%s/metrics", _settings.server.host, _settings.telemetry.metrics_port
        )


def post_fork(server: Any, worker: Any) -> None:
    from app.telemetry import tracing

    tracing.configure(_settings.telemetry.otel)


def worker_exit(server: Any, worker: Any) -> None:
    from app.telemetry import tracing

    tracing.shutdown()  # flush spans of a worker that is going away


def child_exit(server: Any, worker: Any) -> None:
    # Runs in the master: drop the dead worker's live gauges (in-flight requests, pool use).
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from app.telemetry.metrics import mark_worker_dead

        mark_worker_dead(worker.pid)


def on_exit(server: Any) -> None:
    if _own_metrics_dir is not None:
        import shutil

        shutil.rmtree(_own_metrics_dir, ignore_errors=True)
