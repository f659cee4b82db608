"""`make bench`: the service against the practical limit, bare FastAPI, FastAPI with the standard
instrumentations, and the common pattern, side by side.

Starts a throwaway PostgreSQL cluster and PgBouncer 1.24 (prepared statements) and < 1.21
(compatibility mode) on loopback, seeds items, and runs every server under gunicorn with uvicorn
workers, the service exactly as in production (metrics on, tracing on at the default sampling
with an exporter pointed at a local sink). wrk drives each route in turn, bounded in time; the
servers take turns in every round and the table reports the median of the rounds.

Environment: BENCH_DURATION (seconds per run, 5), BENCH_ROUNDS (3), BENCH_CONNECTIONS (64),
BENCH_ROWS (20000), BENCH_WORKERS (2), BENCH_STREAMS (10000 concurrent SSE streams held by one
worker), BENCH_STREAM_RAMP (500 new streams per second), BENCH_EXPORT_ROWS (1000000),
BENCH_STREAM_RUNS (3 runs of the held streams), BENCH_SCALE_ROWS (2000000, the scale section's
large size), BENCH_SCALE_ROUNDS (3), BENCH_SECTIONS (routes,scaling,cold,streams,export,scale),
BENCH_SERVERS (comma-separated names for a quicker inner loop, e.g. `itemstream`; the limit and
FastAPI + std instrumentation always run, since the ratios are against them)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.db.migrations import migrate  # noqa: E402
from app.domain.principal import DEFAULT_TENANT  # noqa: E402
from bench.jwt_issuer import BenchIssuer  # noqa: E402
from bench.load import (  # noqa: E402
    CONNECTIONS,
    DURATION,
    Run,
    Server,
    gunicorn,
    itemstream,
    median_run,
    running,
    stop_server,
    wait_ready,
    wrk,
)
from bench.scale import measure_scale  # noqa: E402
from bench.streams import export, hold_streams  # noqa: E402
from bench.targets import JWT as JWT_ROW  # noqa: E402
from bench.targets import print_targets  # noqa: E402
from harness.pgbouncer import LEGACY, MODERN, PgBouncer, find_binary  # noqa: E402
from harness.postgres import PostgresServer, throwaway_cluster  # noqa: E402
from harness.processes import free_port, run_coroutine, worker_pids  # noqa: E402
from harness.servers import clean_env  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
ROWS = int(os.environ.get("BENCH_ROWS", "20000"))
WORKERS = int(os.environ.get("BENCH_WORKERS", "2"))
SECTIONS = set(
    os.environ.get("BENCH_SECTIONS", "routes,scaling,cold,streams,export,scale").split(",")
)
STREAM_RUNS = int(os.environ.get("BENCH_STREAM_RUNS", "3"))
BASELINES = ("limit", "FastAPI + std instrumentation")
ONLY = [name.strip() for name in os.environ.get("BENCH_SERVERS", "").split(",") if name.strip()]
STREAMS = int(os.environ.get("BENCH_STREAMS", "10000"))
STREAM_RAMP = int(os.environ.get("BENCH_STREAM_RAMP", "500"))  # new streams per second
EXPORT_ROWS = int(os.environ.get("BENCH_EXPORT_ROWS", "1000000"))
RESULTS = Path(__file__).parent / "results"
WORDS = ["amber", "birch", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "ivory", "jade"]

ROUTES: dict[str, tuple[str, str | None]] = {
    "get by id": ("/", "get.lua"),
    "list page (filtered)": (
        "/v1/items?is_active=true&min_price=10&max_price=800&per_page=20",
        None,
    ),
    "search": ("/", "search.lua"),
    "create": ("/", "create.lua"),
    "patch": ("/", "patch.lua"),
}


class _Sink(BaseHTTPRequestHandler):
    """The OTLP exporter's endpoint (accepts and drops), and the JWT row's JWKS."""

    jwks = b'{"keys": []}'

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.jwks)))
        self.end_headers()
        self.wfile.write(self.jwks)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


# --- data ------------------------------------------------------------------------------------


async def seed(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """
            INSERT INTO items (id, name, description, price, is_active, created_at, updated_at)
            SELECT gen_random_uuid(),
                   ($2::text[])[1 + n % 10] || (n % 100) || ' item ' || n,
                   'a ' || ($2::text[])[1 + (n / 7) % 10] || ' thing',
                   (n % 1000) + 0.5, n % 5 <> 0,
                   now() - make_interval(secs => n), now()
            FROM generate_series(1, $1) AS n
            """,
            ROWS,
            WORDS,
        )
        await conn.execute("VACUUM ANALYZE items")
        ids = await conn.fetch("SELECT id FROM items ORDER BY random() LIMIT 5000")
        return [str(row["id"]) for row in ids]
    finally:
        await conn.close()


# --- the run ---------------------------------------------------------------------------------


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds the ExitStack: servers, PgBouncers, Postgres


def main() -> int:
    signal.signal(signal.SIGTERM, _exit_on_signal)
    if shutil.which("wrk") is None:
        sys.exit("bench: wrk is not installed (apt-get install wrk)")
    modern_bin, legacy_bin = find_binary(MODERN), find_binary(LEGACY)
    if modern_bin is None or legacy_bin is None:
        sys.exit(
            "bench: needs PgBouncer >= 1.21 and < 1.21 (set PGBOUNCER_MODERN/LEGACY; `make bench` does)"
        )
    RESULTS.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="itemstream-bench-"))
    ids_file = work / "ids.txt"
    results: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(),
        "config": {
            "duration_s": DURATION,
            "rounds": ROUNDS,
            "connections": CONNECTIONS,
            "rows": ROWS,
            "workers": WORKERS,
            "cpus": os.cpu_count(),
        },
    }
    with ExitStack() as stack:
        print(
            f"bench: throwaway PostgreSQL, {ROWS} rows, PgBouncer {modern_bin} and {legacy_bin}",
            flush=True,
        )
        pg: PostgresServer = throwaway_cluster()
        stack.callback(pg.close)
        database = pg.create_database("bench")
        direct = pg.url(database)
        run_coroutine(lambda: migrate(direct))
        dsn = f"postgresql://postgres@127.0.0.1:{pg.port}/{database}"
        ids_file.write_text("\n".join(run_coroutine(lambda: seed(dsn))) + "\n")
        modern = PgBouncer(modern_bin, MODERN, pg.host, pg.port, pool_size=20).start()
        stack.callback(modern.close)
        legacy = PgBouncer(legacy_bin, LEGACY, pg.host, pg.port, pool_size=20).start()
        stack.callback(legacy.close)
        sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
        threading.Thread(target=sink.serve_forever, daemon=True).start()
        stack.callback(sink.shutdown)

        def via(bouncer: PgBouncer) -> str:
            return f"postgresql://postgres@127.0.0.1:{bouncer.port}/{database}"

        service_env = clean_env(
            DATABASE_URL=via(modern),
            MIGRATION_DATABASE_URL=dsn,
            DB_POOLER="pgbouncer",
            ENVIRONMENT="production",
            AUTH_ALLOW_UNAUTHENTICATED="true",
            CURSOR_SECRETS="bench-cursor-key-0123456789abcdef",
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{sink.server_port}",
            OTEL_SERVICE_NAME="itemstream-bench",
        )
        legacy_env = {**service_env, "DATABASE_URL": via(legacy), "DB_POOLER": "pgbouncer-legacy"}
        # The service with JWT auth on: tokens verified against the sink's JWKS, one token for
        # the whole run (of the seeded items' tenant), as a client with a cached token sends.
        issuer = BenchIssuer.new()
        _Sink.jwks = issuer.jwks()
        jwt_env = {
            **service_env,
            "AUTH_MODE": "jwt",
            "AUTH_ALLOW_UNAUTHENTICATED": "false",
            "AUTH_ISSUER": issuer.issuer,
            "AUTH_AUDIENCE": issuer.audience,
            "AUTH_JWKS_URL": f"http://127.0.0.1:{sink.server_port}/jwks",
        }
        bearer = {"Authorization": f"Bearer {issuer.token(DEFAULT_TENANT)}"}
        # name -> (process label, argv, environment), in the order the table lists them.
        specs: dict[str, tuple[str, list[str], dict[str, str]]] = {
            "limit": (
                "limit",
                gunicorn("bench.limit_server:app", WORKERS),
                {**clean_env(), "LIMIT_DSN": via(modern)},
            ),
            "bare FastAPI": (
                "bare-fastapi",
                gunicorn("bench.bare_fastapi:app", WORKERS),
                {**clean_env(), "LIMIT_DSN": via(modern)},
            ),
            "FastAPI + std instrumentation": (
                "fastapi-instrumented",
                gunicorn("bench.bare_fastapi:app", WORKERS),
                {
                    **clean_env(),
                    "LIMIT_DSN": via(modern),
                    "BENCH_INSTRUMENTED": "1",
                    "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_port}",
                },
            ),
            "itemstream": ("itemstream", itemstream(WORKERS), service_env),
            JWT_ROW: ("itemstream-jwt", itemstream(WORKERS), jwt_env),
            # The same with asyncpg's pool (DB_POOL_IMPL=asyncpg) instead of app/db/pool.py.
            "itemstream (asyncpg pool)": (
                "itemstream-asyncpg-pool",
                itemstream(WORKERS),
                {**service_env, "DB_POOL_IMPL": "asyncpg"},
            ),
            "itemstream (PgBouncer 1.18)": ("itemstream-legacy", itemstream(WORKERS), legacy_env),
            "common pattern": (
                "common",
                gunicorn("bench.common_pattern:app", WORKERS),
                {
                    **clean_env(),
                    "COMMON_URL": via(modern).replace("postgresql:", "postgresql+asyncpg:"),
                },
            ),
        }
        servers = {
            name: stack.enter_context(running(label, argv, env))
            for name, (label, argv, env) in specs.items()
            if not ONLY or name in ONLY or name in BASELINES
        }
        roots = {"postgres": pg.process.pid if pg.process else 0, "pgbouncer": 0}

        def measure(server: Server, bouncer: PgBouncer, path: str, script: str | None) -> Run:
            assert bouncer.process is not None
            cpu_roots = {
                "app": server.proc.pid,
                "postgres": roots["postgres"],
                "pgbouncer": bouncer.process.pid,
            }
            headers = bearer if server.name == "itemstream-jwt" else {}
            return wrk(server.url + path, script, ids_file, cpu_roots, headers=headers)

        # 1. Routes: every server in turn, every round.
        route_results: dict[str, dict[str, Any]] = {}
        for route, (path, script) in ROUTES.items() if "routes" in SECTIONS else ():
            runs: dict[str, list[Run]] = {name: [] for name in servers}
            for _ in range(ROUNDS):
                for name, server in servers.items():
                    bouncer = legacy if "1.18" in name else modern
                    runs[name].append(measure(server, bouncer, path, script))
            route_results[route] = {name: median_run(r) for name, r in runs.items()}
            limit = route_results[route]["limit"]
            usual = route_results[route]["FastAPI + std instrumentation"]
            for summary in route_results[route].values():
                summary["ratio_to_limit"] = _ratio(summary["rps"], limit["rps"])
                summary["ratio_to_instrumented"] = _ratio(summary["rps"], usual["rps"])
                summary["p99_to_limit"] = _ratio(summary["p99_ms"], limit["p99_ms"])
            print(
                f"  {route}: "
                + ", ".join(f"{n} {s['rps']:.0f} rps" for n, s in route_results[route].items()),
                flush=True,
            )
        results["routes"] = route_results

        # 2. Worker scaling for the service: 1, one per core, and the classic 2 x cores + 1.
        for name in list(servers)[1:]:
            stop_server(servers[name])
        cpus = os.cpu_count() or 1
        scaling: dict[str, dict[str, Any]] = {}
        for workers in sorted({1, cpus, 2 * cpus + 1}) if "scaling" in SECTIONS else ():
            with running(f"itemstream-w{workers}", itemstream(workers), service_env) as server:
                for route in ("get by id", "list page (filtered)"):
                    path, script = ROUTES[route]
                    runs_w = [measure(server, modern, path, script) for _ in range(ROUNDS)]
                    scaling.setdefault(route, {})[str(workers)] = median_run(runs_w)
            print(
                f"  workers={workers}: "
                + ", ".join(f"{r} {scaling[r][str(workers)]['rps']:.0f} rps" for r in scaling),
                flush=True,
            )
        results["worker_scaling"] = scaling

        # 3. Cold start: process start to the first ready /readyz.
        cold = []
        for _ in range(3 if "cold" in SECTIONS else 0):
            port = free_port()
            started = time.monotonic()
            proc = subprocess.Popen(
                [*itemstream(WORKERS), "--port", str(port)],
                cwd=ROOT,
                env={**service_env, "PYTHONPATH": str(ROOT)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            server = Server("cold", port, proc)
            wait_ready(server)
            cold.append(time.monotonic() - started)
            stop_server(server)
        if cold:
            results["cold_start_s"] = {
                "median": round(statistics.median(cold), 2),
                "runs": [round(c, 2) for c in cold],
            }

        # 4. Streams: many concurrent SSE streams held by one worker (mock provider).
        if "streams" in SECTIONS:
            results["streams"] = measure_streams(service_env)

        # 5. Export: a large table as NDJSON and CSV, through both PgBouncer generations.
        if "export" in SECTIONS:
            results["export"] = measure_export(pg, modern, legacy, service_env)

        # 6. Scale: the routes at 20k and 2M catalog items, their plans, and starvation.
        if "scale" in SECTIONS:
            for name in list(servers)[:1]:
                stop_server(servers[name])
            results["scale"] = measure_scale(service_env, work, WORKERS)

    results["finished"] = datetime.now(UTC).isoformat()
    out = RESULTS / f"bench-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(results, indent=2))
    print_table(results)
    print_targets(results)
    print(f"\nJSON: {out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def streams_env(service_env: dict[str, str]) -> dict[str, str]:
    """Long streams (a token every 2 s for 60 s): all `STREAMS` are open at the same time."""
    return {
        **service_env,
        "MOCK_TOKENS": "30",
        "MOCK_TOKEN_DELAY": "2",
        "STREAM_MAX_CONCURRENT": str(STREAMS + 1000),
        "DB_POOL_SIZE": "20",
        "DB_MAX_OVERFLOW": "10",
        "DB_POOL_TIMEOUT": "30",
        "LOG_LEVEL": "WARNING",
    }


def measure_streams(service_env: dict[str, str]) -> dict[str, Any]:
    import asyncio

    out: dict[str, Any] = {}
    held_env = streams_env(service_env)
    cases = [
        (
            "ttft at 100 concurrent",
            100,
            {**held_env, "MOCK_TOKENS": "3", "MOCK_TOKEN_DELAY": "0.05"},
        )
    ]
    cases += [
        (f"{STREAMS} held by one worker, run {run + 1}", STREAMS, held_env)
        for run in range(STREAM_RUNS)
    ]
    for label, count, env in cases:
        with running("itemstream-streams", itemstream(1), env) as server:
            (worker,) = worker_pids(server.proc.pid)
            result = asyncio.run(hold_streams(server.port, worker, count, ramp_per_s=STREAM_RAMP))
        out[label] = {**result.__dict__, "kib_per_stream": round(result.kib_per_stream, 1)}
        print(
            f"  streams, {label}: {result.established}/{count} established, "
            f"{result.failed} failed {result.failures or ''}, RSS {result.rss_idle_mib} -> {result.rss_peak_mib} MiB "
            f"({result.kib_per_stream:.1f} KiB/stream), TTFT p50 {result.ttft_p50_ms} ms "
            f"p99 {result.ttft_p99_ms} ms",
            flush=True,
        )
    return out


def measure_export(
    pg: PostgresServer, modern: PgBouncer, legacy: PgBouncer, service_env: dict[str, str]
) -> dict[str, Any]:
    database = pg.create_database("bench_export")
    run_coroutine(lambda: migrate(pg.url(database)))
    dsn = f"postgresql://postgres@127.0.0.1:{pg.port}/{database}"

    async def seed_export() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                """INSERT INTO items (id, name, description, price, is_active, version,
                                      created_at, updated_at)
                   SELECT gen_random_uuid(), 'item ' || n, 'a description of item ' || n,
                          (n % 100000) / 100.0, n % 3 <> 0, 1,
                          now() - n * interval '1 second', now()
                   FROM generate_series(1, $1) AS n""",
                EXPORT_ROWS,
            )
            await conn.execute("VACUUM ANALYZE items")
        finally:
            await conn.close()

    run_coroutine(seed_export)
    out: dict[str, Any] = {}
    for bouncer, pooler in ((modern, "pgbouncer"), (legacy, "pgbouncer-legacy")):
        env = {
            **service_env,
            "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{bouncer.port}/{database}",
            "MIGRATION_DATABASE_URL": dsn,
            "DB_POOLER": pooler,
        }
        with running(f"itemstream-export-{pooler}", itemstream(1), env) as server:
            (worker,) = worker_pids(server.proc.pid)
            for fmt in ("ndjson", "csv"):
                runs = [export(server.url, worker, fmt) for _ in range(ROUNDS)]
                assert all(r.rows == EXPORT_ROWS for r in runs), [r.rows for r in runs]
                label = (
                    f"{fmt} via {'PgBouncer 1.24' if pooler == 'pgbouncer' else 'PgBouncer 1.18'}"
                )
                rates = sorted(r.rows_per_s for r in runs)
                out[label] = {
                    "rows": EXPORT_ROWS,
                    "rows_per_s_median": round(statistics.median(rates)),
                    "seconds": [r.seconds for r in runs],
                    "rss_before_mib": runs[0].rss_before_mib,
                    "rss_peak_mib": max(r.rss_peak_mib for r in runs),
                }
                print(
                    f"  export {label}: {statistics.median(rates):,.0f} rows/s, worker RSS "
                    f"{runs[0].rss_before_mib} -> peak {out[label]['rss_peak_mib']} MiB",
                    flush=True,
                )
    pg.drop_database(database)
    return out


def _ratio(value: float, base: float) -> float | None:
    return round(value / base, 2) if base else None


def print_table(results: dict[str, Any]) -> None:
    config = results["config"]
    print(
        f"\n{config['rows']} rows, {config['connections']} connections, {config['duration_s']} s x "
        f"{config['rounds']} rounds (median), {config['workers']} workers, {config['cpus']} CPUs, wrk on the same box"
    )
    header = (
        f"{'route':<22}{'server':<30}{'rps':>8}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
        f"{'x limit':>9}{'x instr':>9}{'p99 x lim':>10}   cpu cores app/pg/pgb/wrk"
    )
    print(header)
    print("-" * len(header))
    for route, by_server in results.get("routes", {}).items():
        for name, s in by_server.items():
            cpu = s["cpu_cores"]
            split = (
                f"{cpu['app']:.2f}/{cpu['postgres']:.2f}/{cpu['pgbouncer']:.2f}/{cpu['wrk']:.2f}"
            )
            print(
                f"{route:<22}{name:<30}{s['rps']:>8.0f}{s['p50_ms']:>9.2f}{s['p99_ms']:>9.2f}{s['errors']:>8}"
                f"{s['ratio_to_limit']:>9.2f}{s['ratio_to_instrumented']:>9.2f}"
                f"{s['p99_to_limit']:>10.2f}   {split}"
            )
    print("\nworker scaling (itemstream):")
    for route, by_workers in results.get("worker_scaling", {}).items():
        base = by_workers["1"]["rps"]
        cells = ", ".join(
            f"{w} workers {s['rps']:.0f} rps ({s['rps'] / base:.2f}x, p99 {s['p99_ms']:.1f} ms)"
            for w, s in by_workers.items()
        )
        print(f"  {route}: {cells}")
    if "cold_start_s" in results:
        cold = results["cold_start_s"]
        print(f"\ncold start to ready: median {cold['median']} s ({cold['runs']})")
    if "streams" in results:
        print("\nSSE streams (mock provider, one worker):")
        for label, r in results["streams"].items():
            print(
                f"  {label}: {r['established']}/{r['requested']} open at once, {r['failed']} failed {r['failures'] or ''}, "
                f"worker RSS {r['rss_idle_mib']} -> {r['rss_peak_mib']} MiB ({r['kib_per_stream']} KiB/stream), "
                f"time to first token p50 {r['ttft_p50_ms']} ms, p99 {r['ttft_p99_ms']} ms"
            )
    if "export" in results:
        print("\nexport (one worker):")
        for label, r in results["export"].items():
            print(
                f"  {label}: {r['rows']:,} rows, {r['rows_per_s_median']:,} rows/s (median), "
                f"worker RSS {r['rss_before_mib']} -> peak {r['rss_peak_mib']} MiB"
            )


if __name__ == "__main__":
    raise SystemExit(main())
