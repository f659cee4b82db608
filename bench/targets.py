"""The performance targets (issue 27), each figure of a `make bench` run beside its threshold:
met, missed, or not measured in this run. Ratios come from one run, never from timed tests.

1. the service >= 0.85x bare FastAPI's rps on every route, p99 <= 1.5x its p99
2. 10,000 streams held by one worker: 0 failures, < 40 KiB each, TTFT p99 < 1 s, every run
3. each route at 2M rows >= 0.8x its rps at 20k rows, with a bounded plan (buffers)
4. beside 64 clients of the most expensive search, the others' get by id and create keep
   >= 0.8x the rps and <= 2x the p99 they have beside 64 clients of get by id
6. cold start (exec to /readyz 200) median < 2 s
(5, flat over time, is `make soak`'s.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SERVICE = "itemstream"
BARE = "bare FastAPI"
JWT = "itemstream (JWT auth)"
# A plan is bounded when a 100x larger table costs it at most this many times the buffers.
BUFFER_GROWTH = 5.0


@dataclass(frozen=True)
class Check:
    target: str
    what: str
    figure: str
    threshold: str
    met: bool | None  # None: not measured in this run


def _routes(results: dict[str, Any]) -> list[Check]:
    checks = []
    for route, servers in results.get("routes", {}).items():
        ours, bare, jwt = servers.get(SERVICE), servers.get(BARE), servers.get(JWT)
        if ours is None or bare is None:
            continue
        rps = ours["rps"] / bare["rps"] if bare["rps"] else 0.0
        p99 = ours["p99_ms"] / bare["p99_ms"] if bare["p99_ms"] else float("inf")
        checks.append(
            Check("1", f"{route}: rps vs bare FastAPI", f"{rps:.2f}x", ">= 0.85x", rps >= 0.85)
        )
        checks.append(
            Check("1", f"{route}: p99 vs bare FastAPI", f"{p99:.2f}x", "<= 1.5x", p99 <= 1.5)
        )
        if jwt is None:
            checks.append(Check("1", f"{route}, JWT auth: rps vs bare", "-", ">= 0.8x", None))
        else:
            ratio = jwt["rps"] / bare["rps"] if bare["rps"] else 0.0
            checks.append(
                Check(
                    "1", f"{route}, JWT auth: rps vs bare", f"{ratio:.2f}x", ">= 0.8x", ratio >= 0.8
                )
            )
    return checks


def _streams(results: dict[str, Any]) -> list[Check]:
    checks = []
    for label, run in results.get("streams", {}).items():
        if "held" not in label:
            continue
        ok = (
            run["failed"] == 0
            and run["established"] == run["requested"]
            and run["kib_per_stream"] < 40
            and run["ttft_p99_ms"] < 1000
        )
        figure = (
            f"{run['established']}/{run['requested']} open, {run['failed']} failed, "
            f"{run['kib_per_stream']} KiB, TTFT p99 {run['ttft_p99_ms']} ms"
        )
        checks.append(Check("2", label, figure, "0 failed, < 40 KiB, p99 < 1000 ms", ok))
    return checks


def _scale(results: dict[str, Any]) -> list[Check]:
    scale = results.get("scale")
    if not scale:
        return []
    small, large = (scale["sizes"][key] for key in sorted(scale["sizes"], key=int))
    checks = []
    for route, big in large["routes"].items():
        base = small["routes"].get(route)
        if not base or not base["rps"]:
            continue
        ratio = big["rps"] / base["rps"]
        plan_small = small["plans"].get(route)
        plan_large = large["plans"].get(route)
        figure = f"{ratio:.2f}x ({base['rps']:.0f} -> {big['rps']:.0f})"
        met = ratio >= 0.8
        if plan_small and plan_large:
            growth = plan_large["buffers"] / max(plan_small["buffers"], 1)
            figure += f", buffers {plan_small['buffers']} -> {plan_large['buffers']}"
            met = met and growth <= BUFFER_GROWTH
        checks.append(Check("3", route, figure, f">= 0.8x, buffers <= {BUFFER_GROWTH:.0f}x", met))
    return checks


def _starvation(results: dict[str, Any]) -> list[Check]:
    starvation = (results.get("scale") or {}).get("starvation")
    if not starvation:
        return []
    loud, even = starvation["expensive search"]["others"], starvation["get by id"]["others"]
    checks = []
    for route in loud:
        rps = loud[route]["rps"] / even[route]["rps"] if even[route]["rps"] else 0.0
        p99 = loud[route]["p99_ms"] / even[route]["p99_ms"] if even[route]["p99_ms"] else 0.0
        checks.append(
            Check("4", f"{route} beside the search: rps", f"{rps:.2f}x", ">= 0.8x", rps >= 0.8)
        )
        checks.append(
            Check("4", f"{route} beside the search: p99", f"{p99:.2f}x", "<= 2x", p99 <= 2)
        )
    return checks


def _cold(results: dict[str, Any]) -> list[Check]:
    cold = results.get("cold_start_s")
    if not cold:
        return []
    return [
        Check(
            "6",
            "cold start to ready",
            f"{cold['median']} s {cold['runs']}",
            "< 2 s",
            cold["median"] < 2,
        )
    ]


def checks(results: dict[str, Any]) -> list[Check]:
    return [
        *_routes(results),
        *_streams(results),
        *_scale(results),
        *_starvation(results),
        *_cold(results),
    ]


def print_targets(results: dict[str, Any]) -> None:
    found = checks(results)
    if not found:
        return
    print("\ntargets (5, flat over time, is make soak's):")
    for check in found:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[check.met]
        print(f"  {check.target}  {check.what:<48}{check.figure:<52}{check.threshold:<36}{verdict}")
    met = sum(1 for c in found if c.met)
    missed = sum(1 for c in found if c.met is False)
    print(f"  {met} met, {missed} missed, {len(found) - met - missed} not measured")
