"""`make fleet`: the service as a fleet on loopback (harness/fleet.py), to watch by hand what
tests/test_fleet.py asserts. PostgreSQL (the local server when it answers, else a throwaway
cluster), a modern PgBouncer, FLEET_SIZE (3) instances as the chart runs them (gunicorn,
production settings, each its own metrics port) behind HAProxy, and Prometheus with the
chart's recording rules and alerts. Prints where each piece listens; Ctrl-C stops it all.

    make fleet                      # then: curl localhost:<service>/v1/items, open Prometheus
    FLEET_SIZE=5 make fleet
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.db.migrations import migrate  # noqa: E402
from harness import fleet as fleet_rig  # noqa: E402
from harness.fleet import Fleet, chart_rules  # noqa: E402
from harness.pgbouncer import MODERN, PgBouncer, find_binary  # noqa: E402
from harness.postgres import start_or_find  # noqa: E402
from harness.processes import run_coroutine  # noqa: E402
from harness.servers import production_env  # noqa: E402


def say(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


def main() -> int:
    # Prerequisites first: a missing one stops here, before anything is started.
    why = fleet_rig.available()
    binary = find_binary(MODERN)
    if why is not None or binary is None:
        raise SystemExit(
            f"make fleet: {why or 'no PgBouncer >= 1.21'}; run scripts/setup.sh (make test "
            "does). Nothing was started."
        )
    helm = (
        os.environ.get("HELM")
        or subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "install_helm.py")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    rules = chart_rules(helm)
    pg = start_or_find()
    database = pg.create_database("itemstream_fleet")
    run_coroutine(lambda: migrate(pg.url(database)))
    bouncer = PgBouncer(binary=binary, kind=MODERN, server_host=pg.host, server_port=pg.port)
    bouncer.start()
    env = production_env(
        pg,
        bouncer,
        database,
        LOG_FORMAT=os.environ.get("LOG_FORMAT", "json"),
    )
    fleet = Fleet(
        env,
        size=int(os.environ.get("FLEET_SIZE", "3")),
        rules=rules,
        bouncer=f"127.0.0.1:{bouncer.port}",
    )
    try:
        fleet.start()
        say(f"the Service (HAProxy): {fleet.base}")
        for instance in fleet.instances:
            say(
                f"{instance.name}: http://127.0.0.1:{instance.port}, metrics on "
                f":{instance.metrics_port}, log {instance.log}"
            )
        say(f"Prometheus: http://127.0.0.1:{fleet.prometheus_port} (rules and alerts loaded)")
        say(f"PgBouncer exporter: http://127.0.0.1:{fleet.exporter_port}/metrics")
        if fleet.traces is not None:
            say(f"OTLP receiver (traces of every instance): {fleet.traces.endpoint}/v1/traces")
        say(f"PostgreSQL {pg.host}:{pg.port} database {database}; PgBouncer :{bouncer.port}")
        say("Ctrl-C stops everything")
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
        return 0
    finally:
        fleet.close()
        bouncer.close()
        pg.drop_database(database)
        pg.close()


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    raise SystemExit(main())
