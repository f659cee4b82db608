"""gunicorn configuration for `itemstream serve` (loaded with `-c python:app.gunicorn_conf`).
Every value can be overridden with GUNICORN_CMD_ARGS."""

from __future__ import annotations

import os

from app.config import Settings
from app.workers import worker_count

_settings = Settings()

bind = [f"{_settings.host}:{_settings.port}"]
worker_class = "uvicorn_worker.UvicornWorker"
# The embedded SQLite database takes one writer; Postgres deployments size by CPU.
workers = 1 if _settings.is_sqlite else worker_count()
# With async workers `timeout` is an event-loop heartbeat, not a request timeout.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "60"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
# Longer than the idle timeout of the proxies in front (ALB/nginx/Envoy default 60 s), so the
# proxy closes idle connections first and never reuses one we just closed (502s).
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "75"))
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "0"))
max_requests_jitter = int(os.environ.get("GUNICORN_MAX_REQUESTS_JITTER", "0")) or (
    max_requests // 10
)
# Heartbeat file on tmpfs: fchmod on a disk-backed /tmp can block the worker.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108
preload_app = False  # engines and telemetry must be created after the fork
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
accesslog = None
errorlog = "-"
loglevel = _settings.log_level.lower()
proc_name = "itemstream"
# The control socket (gunicorn >= 24) would need a writable home; we do not use it.
control_socket_disable = True
