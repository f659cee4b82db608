"""`itemstream` command line: the one entry point used by README, Dockerfile and Helm chart."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from pydantic import ValidationError

from app import __version__
from app.config import SECRET_VARIABLES, URL_VARIABLES, Settings, env_variable
from app.db import migrations
from app.telemetry.logs import configure_logging, logging_config
from app.telemetry.redact import redact

log = logging.getLogger("itemstream")


def _load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        lines = []
        for problem in error.errors():
            # A rule across settings names its variables in the message itself.
            message = problem["msg"].removeprefix("Value error, ")
            variable = env_variable(problem["loc"])
            given = problem.get("input")
            if variable and isinstance(given, str | int | float) and not isinstance(given, bool):
                # The value as given, so a typo shows; never a secret, and no URL password.
                shown = "(hidden)" if variable in SECRET_VARIABLES else redact(repr(given))[:100]
                message = f"{message} (got {shown})"
            lines.append(f"  {variable}: {message}" if variable else f"  {message}")
        _refuse(lines)


def _refuse(lines: list[str]) -> NoReturn:
    sys.stderr.write("itemstream: invalid configuration\n" + "\n".join(lines) + "\n")
    raise SystemExit(2)


def _check_serving(settings: Settings) -> None:
    """The rules for a process that serves requests (serve, check-config)."""
    refused, warnings = settings.unknown_variables(os.environ)
    for warning in warnings:
        log.warning("%s", warning)
    problems = settings.serving_problems() + refused
    if problems:
        _refuse([f"  {problem}" for problem in problems])


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    try:
        applied = asyncio.run(
            migrations.migrate(
                settings.db.migrations_url,
                revision=args.revision,
                lock_timeout=settings.db.migration_lock_timeout,
                wait_seconds=settings.db.migration_wait_seconds,
            )
        )
    except migrations.MigrationLockTimeout as error:
        log.error("%s", error)
        return 3
    log.info("migrations %s", "applied" if applied else "already up to date")
    return 0


def cmd_wait(settings: Settings, args: argparse.Namespace) -> int:
    try:
        asyncio.run(migrations.wait_for_head(settings.db.migrations_url, wait_seconds=args.timeout))
    except TimeoutError as error:
        log.error("schema not at head after %ss: %s", args.timeout, error)
        return 1
    return 0


def _serve_metrics_beside_reloader(settings: Settings) -> None:
    """`serve --reload` (the dev loop) has no gunicorn master: serve METRICS_PORT from the
    reloader process instead, reading the app process's multiprocess files."""
    if not (settings.telemetry.metrics_enabled and settings.telemetry.metrics_port):
        return
    import tempfile

    from app.telemetry.metrics import prepare_multiprocess_dir, start_metrics_server

    directory = os.environ.setdefault(
        "PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="itemstream-metrics-")
    )
    prepare_multiprocess_dir(directory)
    start_metrics_server(settings.telemetry.metrics_port, settings.server.host)


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    _check_serving(settings)
    # Outside production `serve` brings the schema to head itself (SQLite or PostgreSQL); in
    # production that is the migration Job's work, and a pending migration makes readiness and
    # every request answer 503 naming it.
    migrate_first = settings.environment != "production" if args.migrate is None else args.migrate
    if migrate_first and cmd_migrate(settings, argparse.Namespace(revision="head")) != 0:
        return 1
    if args.host:
        os.environ["HOST"] = args.host
    if args.port:
        os.environ["PORT"] = str(args.port)
    if args.workers:
        os.environ["WEB_CONCURRENCY"] = str(args.workers)
    if args.reload:
        import uvicorn

        _serve_metrics_beside_reloader(settings)
        base = f"http://{args.host or settings.server.host}:{args.port or settings.server.port}"
        log.info("itemstream API at %s, docs at %s/docs (reloading on changes)", base, base)

        uvicorn.run(
            "app.main:create_app",
            factory=True,
            host=args.host or settings.server.host,
            port=args.port or settings.server.port,
            reload=True,
            reload_dirs=["app"],
            http="app.protocol:FromEnvironment",
            root_path=settings.server.root_path,
            server_header=settings.server.http.server_header,
            # The service's own format, not uvicorn's (as under gunicorn).
            log_config=logging_config(settings.telemetry.log_level, settings.telemetry.log_format),
        )
        return 0
    return _exec_gunicorn()


def _exec_gunicorn() -> NoReturn:
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        "python:app.gunicorn_conf",
        "app.main:create_app()",
    ]
    sys.stdout.flush()
    sys.stderr.flush()
    # gunicorn replaces this process, so it is PID 1 in a container and receives the signals.
    os.execv(sys.executable, argv)  # noqa: S606 - fixed argv, no shell


def cmd_check_config(settings: Settings, args: argparse.Namespace) -> int:
    """Every variable with the value the app uses; secrets as ***, and every URL setting with
    its password as *** (the list of URL settings is derived from the settings tree)."""
    _check_serving(settings)
    for name, value in sorted(settings.variables().items()):
        text = _as_variable(value)
        print(f"{name}={redact(text) if name in URL_VARIABLES else text}")
    return 0


def _as_variable(value: object) -> str:
    """A value as the environment would give it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="itemstream", description=__doc__)
    parser.add_argument("--version", action="version", version=f"itemstream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service (gunicorn + uvicorn workers)")
    serve.add_argument("--host", help="bind address (default: HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: PORT or 8000)")
    serve.add_argument("--workers", type=int, help="worker processes (default: from CPU limit)")
    serve.add_argument("--reload", action="store_true", help="development: one process, reload")
    serve.add_argument(
        "--migrate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="apply migrations first (default: yes, except with ENVIRONMENT=production)",
    )
    serve.set_defaults(func=cmd_serve)

    migrate = sub.add_parser("migrate", help="apply Alembic migrations (safe to run concurrently)")
    migrate.add_argument("revision", nargs="?", default="head")
    migrate.set_defaults(func=cmd_migrate)

    wait = sub.add_parser("wait-for-migrations", help="block until the schema is at head")
    wait.add_argument("--timeout", type=float, default=600.0)
    wait.set_defaults(func=cmd_wait)

    check = sub.add_parser("check-config", help="validate settings and print them (no secrets)")
    check.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = _load_settings()
    configure_logging(settings.telemetry.log_level, settings.telemetry.log_format)
    result: int = args.func(settings, args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
