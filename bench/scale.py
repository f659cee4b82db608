"""The scale section of `make bench`: the same routes at 20,000 and at 2,000,000 items, and one
route's load beside the others'.

A cluster of its own (shared_buffers 2 GB, as a production database of this size would have),
PgBouncer 1.24 in front, the service as shipped with two workers. Both sizes hold the realistic
catalog of `bench/catalog.py`. For every route the section prints requests per second and p99
at each size, their ratio, and what PostgreSQL did for the route's statements after the
route's load (so after the plan cache has settled on generic plans where it would): the plans
auto_explain logged, with the buffers they touched. A bounded plan touches about as many
buffers at 2M rows as at 20k.

Then starvation: 64 clients run the most expensive search the API accepts (a two-letter term
no trigram index can serve, matching nothing) while 32 others run get by id, then create; the
same again with the 64 running get by id instead. The others' rps and p99 are compared."""

from __future__ import annotations

import json
import os
import re
import statistics
import time
import urllib.parse
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from app.db.migrations import migrate
from bench import catalog
from bench.load import (
    DURATION,
    Run,
    Server,
    itemstream,
    median_run,
    running,
    start_wrk,
    wrk,
)
from bench.streams import export
from harness.pgbouncer import MODERN, PgBouncer, find_binary
from harness.postgres import PostgresServer, throwaway_cluster
from harness.processes import run_coroutine, worker_pids

SIZES = (20_000, int(os.environ.get("BENCH_SCALE_ROWS", "2000000")))
ROUNDS = int(os.environ.get("BENCH_SCALE_ROUNDS", "3"))
DEEP_PAGES = 1000  # the keyset page this many pages in (10 items each)
EXPENSIVE_SEARCH = "qq"  # two letters: no trigram; no word of the catalog has it
SETTINGS = {
    "shared_buffers": "2GB",
    "logging_collector": "on",
    "log_directory": "log",
    "log_filename": "postgresql.log",
    "session_preload_libraries": "auto_explain",
    # auto_explain.log_min_duration stays -1 (off) but around the probes: ALTER SYSTEM and a
    # reload switch it, which a -c setting here would override.
    "auto_explain.log_analyze": "on",
    "auto_explain.log_timing": "off",
    "auto_explain.log_buffers": "on",
    "auto_explain.log_format": "json",
}


@dataclass
class Route:
    label: str
    path: str
    script: str | None = None
    probe: str = ""  # the path of one request whose plan is logged (default: `path`)


@dataclass
class Plan:
    text: str
    buffers: int  # shared buffers hit + read, summed over the request's statements on items

    @property
    def seq_scan(self) -> bool:
        return "Seq Scan on items" in self.text


@dataclass
class SizeResult:
    rows: int
    routes: dict[str, dict[str, Any]] = field(default_factory=dict)
    plans: dict[str, Plan] = field(default_factory=dict)
    matches: dict[str, int] = field(default_factory=dict)


def _routes(deep_cursor: str, sample_id: str) -> list[Route]:
    routes = [
        Route("get by id", "/", "get.lua", f"/v1/items/{sample_id}"),
        Route("list, first page", "/v1/items?per_page=20"),
        Route(
            f"list, keyset page {DEEP_PAGES} deep",
            "/v1/items?per_page=10&cursor=" + urllib.parse.quote(deep_cursor),
        ),
    ]
    for term in catalog.terms():
        routes.append(
            Route(f"search, {term.label}", "/v1/items?per_page=20&q=" + urllib.parse.quote(term.q))
        )
    return routes


def _deep_cursor(base: str) -> str:
    cursor = ""
    with httpx.Client(base_url=base, timeout=30) as client:
        for _ in range(DEEP_PAGES):
            params = {"per_page": "10", **({"cursor": cursor} if cursor else {})}
            page = client.get("/v1/items", params=params).raise_for_status().json()
            cursor = page["next_cursor"]
    return cursor


class Explainer:
    """auto_explain switched on around probe requests; the plans read from the server log."""

    def __init__(self, pg: PostgresServer) -> None:
        assert pg.data_dir is not None
        self.pg = pg
        self.log = pg.data_dir / "log" / "postgresql.log"

    def _set(self, value: str) -> None:
        async def run() -> None:
            conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{self.pg.port}/postgres")
            try:
                await conn.execute(f"ALTER SYSTEM SET auto_explain.log_min_duration = {value}")
                await conn.execute("SELECT pg_reload_conf()")
            finally:
                await conn.close()

        run_coroutine(run)

    def plans_of(self, probe: Callable[[], None]) -> Plan:
        offset = self.log.stat().st_size if self.log.exists() else 0
        self._set("0")
        try:
            time.sleep(0.3)  # backends apply the reload before their next command
            probe()
        finally:
            self._set("-1")
        with self.log.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode(errors="replace")
        return _parse_plans(text)


def _parse_plans(log: str) -> Plan:
    """The plans (auto_explain's JSON) of statements on items, deduplicated, and the shared
    buffers they touched."""
    decoder = json.JSONDecoder()
    shapes: list[str] = []
    buffers = 0
    for match in re.finditer(r"plan:\s*\n", log):
        start = log.find("{", match.end())
        if start < 0:
            break
        try:
            entry, _ = decoder.raw_decode(log, start)
        except json.JSONDecodeError:
            continue
        if " items" not in entry.get("Query Text", ""):
            continue
        plan = entry["Plan"]
        buffers += plan.get("Shared Hit Blocks", 0) + plan.get("Shared Read Blocks", 0)
        shape = "\n".join(_nodes(plan))
        if shape not in shapes:
            shapes.append(shape)
    return Plan("\n---\n".join(shapes), buffers)


def _nodes(plan: dict[str, Any], depth: int = 0) -> list[str]:
    line = "  " * depth + ("-> " if depth else "") + plan["Node Type"]
    if "Index Name" in plan:
        line += f" using {plan['Index Name']}"
    if "Relation Name" in plan:
        line += f" on {plan['Relation Name']}"
    line += f" (rows {plan.get('Actual Rows', '?')}"
    if plan.get("Rows Removed by Filter"):
        line += f", removed by filter {plan['Rows Removed by Filter']}"
    if plan.get("Rows Removed by Index Recheck"):
        line += f", removed by recheck {plan['Rows Removed by Index Recheck']}"
    line += ")"
    lines = [line]
    for child in plan.get("Plans", []):
        lines.extend(_nodes(child, depth + 1))
    return lines


async def _counts(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        out = {}
        for term in catalog.terms():
            pattern = "%" + term.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            out[term.label] = await conn.fetchval(
                "SELECT count(*) FROM items WHERE name ILIKE $1 OR description ILIKE $1",
                pattern + "%",
            )
        return out
    finally:
        await conn.close()


async def _sample_ids(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT id FROM items TABLESAMPLE SYSTEM (1) LIMIT 5000")
        return [str(row["id"]) for row in rows]
    finally:
        await conn.close()


def _env(
    service_env: dict[str, str], bouncer: PgBouncer, dsn: str, database: str
) -> dict[str, str]:
    return {
        **service_env,
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{bouncer.port}/{database}",
        "MIGRATION_DATABASE_URL": dsn,
        "DB_POOLER": "pgbouncer",
        "LOG_LEVEL": "WARNING",
    }


def _roots(server: Server, pg: PostgresServer, bouncer: PgBouncer) -> dict[str, int]:
    assert bouncer.process is not None
    assert pg.process is not None
    return {"app": server.proc.pid, "postgres": pg.process.pid, "pgbouncer": bouncer.process.pid}


def measure_scale(service_env: dict[str, str], work: Path, workers: int) -> dict[str, Any]:
    binary = find_binary(MODERN)
    assert binary is not None
    out: dict[str, Any] = {"sizes": {}, "settings": SETTINGS}
    with ExitStack() as stack:
        pg = throwaway_cluster(settings=SETTINGS)
        stack.callback(pg.close)
        bouncer = PgBouncer(binary, MODERN, pg.host, pg.port, pool_size=20).start()
        stack.callback(bouncer.close)
        explainer = Explainer(pg)
        by_size: dict[int, SizeResult] = {}
        for rows in SIZES:
            database = pg.create_database(f"bench_scale_{rows}")
            run_coroutine(partial(migrate, pg.url(database)))
            dsn = f"postgresql://postgres@127.0.0.1:{pg.port}/{database}"
            print(f"  scale: seeding {rows:,} catalog items", flush=True)
            run_coroutine(partial(catalog.seed, dsn, rows))
            ids = run_coroutine(partial(_sample_ids, dsn))
            ids_file = work / f"scale-ids-{rows}.txt"
            ids_file.write_text("\n".join(ids) + "\n")
            result = SizeResult(rows, matches=run_coroutine(partial(_counts, dsn)))
            env = _env(service_env, bouncer, dsn, database)
            with running(f"itemstream-scale-{rows}", itemstream(workers), env) as server:
                roots = _roots(server, pg, bouncer)
                routes = _routes(_deep_cursor(server.url), ids[0])
                for route in routes:
                    runs = [
                        wrk(server.url + route.path, route.script, ids_file, roots)
                        for _ in range(ROUNDS)
                    ]
                    result.routes[route.label] = median_run(runs)
                    probe_path = route.probe or route.path
                    result.plans[route.label] = explainer.plans_of(
                        partial(_probe, server.url + probe_path)
                    )
                    summary = result.routes[route.label]
                    print(
                        f"  scale {rows:,}: {route.label}: {summary['rps']:.0f} rps, p99 "
                        f"{summary['p99_ms']:.1f} ms, {summary['errors']} errors, "
                        f"{result.plans[route.label].buffers} buffers",
                        flush=True,
                    )
                (worker, *_) = worker_pids(server.proc.pid)
                exports = [export(server.url, worker, "ndjson") for _ in range(ROUNDS)]
                assert all(e.rows == rows for e in exports), [e.rows for e in exports]
                result.routes["export (ndjson rows/s)"] = {
                    "rps": round(statistics.median(e.rows_per_s for e in exports)),
                    "p99_ms": None,
                    "errors": 0,
                }
                if rows == SIZES[-1]:
                    out["starvation"] = starvation(server, roots, ids_file)
            by_size[rows] = result
            out["sizes"][str(rows)] = {
                "routes": result.routes,
                "matches": result.matches,
                "plans": {
                    k: {"text": p.text, "buffers": p.buffers} for k, p in result.plans.items()
                },
            }
            pg.drop_database(database)
    return out


def _probe(url: str) -> None:
    for _ in range(2):
        httpx.get(url, timeout=30)


def starvation(server: Server, roots: dict[str, int], ids_file: Path) -> dict[str, Any]:
    """The others' get by id and create (32 clients), beside 64 clients of the expensive search
    and beside 64 clients of get by id."""
    noisy = {
        "expensive search": ("/v1/items?per_page=20&q=" + EXPENSIVE_SEARCH, None),
        "get by id": ("/", "get.lua"),
    }
    out: dict[str, Any] = {}
    for background, (path, script) in noisy.items():
        measured: dict[str, list[Run]] = {"get by id": [], "create": []}
        loud: list[Run] = []
        for _ in range(ROUNDS):
            load = start_wrk(
                server.url + path,
                script,
                ids_file,
                roots,
                connections=64,
                duration=2 * DURATION + 3,
            )
            for route, others_script in (("get by id", "get.lua"), ("create", "create.lua")):
                measured[route].append(
                    wrk(server.url + "/", others_script, ids_file, roots, connections=32)
                )
            loud.append(load.finish())
        out[background] = {
            "others": {route: median_run(runs) for route, runs in measured.items()},
            "background": median_run(loud),
        }
        print(
            f"  starvation, beside 64 x {background}: "
            + ", ".join(
                f"{route} {s['rps']:.0f} rps p99 {s['p99_ms']:.1f} ms"
                for route, s in out[background]["others"].items()
            )
            + f"; the 64: {out[background]['background']['rps']:.0f} rps, "
            f"{out[background]['background']['errors']} non-2xx",
            flush=True,
        )
    return out
