"""Profile one worker of the service under load: where its CPU goes, per route.

Starts what `make bench` starts (throwaway PostgreSQL, PgBouncer 1.24, the service exactly as
shipped with 2 workers and tracing to a local sink), drives one route with wrk and records one
worker with py-spy for the same time. Prints the frames with the largest inclusive and self
share of samples and keeps the collapsed stacks under bench/results/ (speedscope.app or any
flame graph tool reads them).

    uv run python bench/profile.py "get by id"     # any route of bench/run.py's ROUTES
    uv run python bench/profile.py streams         # one worker while BENCH_STREAMS open

Environment: BENCH_DURATION (seconds, 10), BENCH_CONNECTIONS (64), BENCH_ROWS (20000)."""

from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import sys
import threading
from contextlib import ExitStack
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.db.migrations import migrate  # noqa: E402
from bench import load, run  # noqa: E402
from bench.streams import hold_streams  # noqa: E402
from harness.pgbouncer import MODERN, PgBouncer, find_binary  # noqa: E402
from harness.postgres import throwaway_cluster  # noqa: E402
from harness.processes import run_coroutine, worker_pids  # noqa: E402
from harness.servers import clean_env  # noqa: E402

DURATION = int(os.environ.get("BENCH_DURATION", "10"))
TOP = 30


def _frame_label(frame: str) -> str:
    # py-spy's raw frames: "function (path/to/module.py:line)"; keep the module's tail.
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path, _, _line = where.rpartition(":")
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if parts else where
    return f"{name} ({short})"


def summarize(raw: Path) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """Total samples, and the top frames by inclusive and by self samples."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_label(f) for f in stack.split(";") if f and not f.startswith("process ")]
        if not frames:
            continue
        total += count
        for label in set(frames):
            inclusive[label] += count
        own[frames[-1]] += count
    return total, inclusive.most_common(TOP), own.most_common(TOP)


def main() -> int:
    route = sys.argv[1] if len(sys.argv) > 1 else "get by id"
    streams = route == "streams"
    path, script = ("", None) if streams else run.ROUTES[route]
    binary = find_binary(MODERN)
    if binary is None:
        sys.exit("profile: needs PgBouncer >= 1.21 (PGBOUNCER_MODERN)")
    run.RESULTS.mkdir(exist_ok=True)
    stamp = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    raw = run.RESULTS / f"profile-{route.split()[0]}-{stamp}.txt"
    with ExitStack() as stack:
        pg = throwaway_cluster()
        stack.callback(pg.close)
        database = pg.create_database("bench")
        dsn = f"postgresql://postgres@127.0.0.1:{pg.port}/{database}"
        run_coroutine(lambda: migrate(pg.url(database)))
        ids_file = run.RESULTS / f".ids-{stamp}.txt"
        ids_file.write_text("\n".join(run_coroutine(lambda: run.seed(dsn))) + "\n")
        stack.callback(ids_file.unlink)
        bouncer = PgBouncer(binary, MODERN, pg.host, pg.port, pool_size=20).start()
        stack.callback(bouncer.close)
        sink = ThreadingHTTPServer(("127.0.0.1", 0), run._Sink)
        threading.Thread(target=sink.serve_forever, daemon=True).start()
        stack.callback(sink.shutdown)
        env = clean_env(
            DATABASE_URL=f"postgresql://postgres@127.0.0.1:{bouncer.port}/{database}",
            MIGRATION_DATABASE_URL=dsn,
            DB_POOLER="pgbouncer",
            ENVIRONMENT="production",
            AUTH_ALLOW_UNAUTHENTICATED="true",
            CURSOR_SECRETS="bench-cursor-key-0123456789abcdef",
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{sink.server_port}",
            OTEL_SERVICE_NAME="itemstream-profile",
        )
        workers, seconds = (1, run.STREAMS // run.STREAM_RAMP + 5) if streams else (2, DURATION)
        if streams:
            env = run.streams_env(env)
        server = stack.enter_context(load.running("itemstream", load.itemstream(workers), env))
        worker = worker_pids(server.proc.pid)[0]
        load.DURATION = DURATION
        spy_bin = str(Path(sys.executable).with_name("py-spy"))
        record = ["record", "--pid", str(worker), "--duration", str(seconds), "--rate", "250"]
        spy = subprocess.Popen(
            [spy_bin, *record, "--format", "raw", "--output", str(raw), "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if streams:
            held = asyncio.run(
                hold_streams(server.port, worker, run.STREAMS, ramp_per_s=run.STREAM_RAMP)
            )
            summary = (
                f"{held.established}/{held.requested} streams, {held.failed} failed, time to "
                f"first token p50 {held.ttft_p50_ms} ms, p99 {held.ttft_p99_ms} ms"
            )
        else:
            result = load.wrk(server.url + path, script, ids_file, {"app": server.proc.pid})
            summary = f"{result.rps:.0f} rps, p99 {result.p99_ms:.1f} ms"
        spy.wait(seconds + 30)
    total, inclusive, own = summarize(raw)
    print(f"{route}: {summary}; {total} samples of one worker")
    print("\ninclusive (share of samples with the frame on the stack):")
    for label, count in inclusive:
        print(f"  {100 * count / total:5.1f}%  {label}")
    print("\nself (share of samples with the frame on top):")
    for label, count in own:
        print(f"  {100 * count / total:5.1f}%  {label}")
    print(f"\ncollapsed stacks: {raw}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
