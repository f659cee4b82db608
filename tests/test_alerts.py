"""The chart's alerts, unit-tested with `promtool test rules` on the rules Helm renders: each
alert fires on the series that should page (or ticket) and stays quiet on the ones that
should not. Expected annotations are taken from the rendered rules, so a scenario states only
what it is about: the input series, the time, and which alerts fire."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.helm import CHART, helm, rendered_rules, values_args
from tests.support.skips import missing

RELEASE, NAMESPACE = "itemstream", "apps"
SEL = f'namespace="{NAMESPACE}", job="{RELEASE}"'


@dataclass
class Scenario:
    name: str
    series: dict[str, str]  # series selector -> promtool values
    at: str  # evaluation time
    fires: dict[str, dict[str, str]] = field(default_factory=dict)  # alert -> extra labels
    quiet: tuple[str, ...] = ()  # alerts that must not fire at `at`


def _requests(ok: int, errors: int, minutes: int) -> dict[str, str]:
    return {
        f'http_requests_total{{{SEL}, status="200"}}': f"0+{ok}x{minutes}",
        f'http_requests_total{{{SEL}, status="500"}}': f"0+{errors}x{minutes}",
    }


def _latency(fast: int, total: int, minutes: int) -> dict[str, str]:
    return {
        f'http_request_duration_seconds_bucket{{{SEL}, le="0.5"}}': f"0+{fast}x{minutes}",
        f"http_request_duration_seconds_count{{{SEL}}}": f"0+{total}x{minutes}",
    }


def _hpa(current: int, maximum: int) -> dict[str, str]:
    hpa = f'{{namespace="{NAMESPACE}", horizontalpodautoscaler="{RELEASE}"}}'
    return {
        f"kube_horizontalpodautoscaler_status_current_replicas{hpa}": f"{current}x20",
        f"kube_horizontalpodautoscaler_spec_max_replicas{hpa}": f"{maximum}x20",
    }


JOB = {"namespace": NAMESPACE, "job": RELEASE}
POOL = f'itemstream_db_pool_acquire_seconds_bucket{{{SEL}, le="%s"}}'
SCENARIOS = [
    # 9 % of requests fail for 7 hours: both error-budget alerts (SLO 99.9 %).
    Scenario(
        "errors burn the budget",
        _requests(100, 10, 420),
        "7h",
        {"ItemstreamErrorBudgetBurnFast": JOB, "ItemstreamErrorBudgetBurnSlow": JOB},
    ),
    # 0.5 % errors: inside 6x the budget.
    Scenario(
        "a few errors",
        _requests(1000, 5, 420),
        "7h",
        quiet=("ItemstreamErrorBudgetBurnFast", "ItemstreamErrorBudgetBurnSlow"),
    ),
    # A tenth of the requests are clients that left before any answer (499: closed tabs,
    # streams given up before their first token): not the service's errors, no page.
    Scenario(
        "clients leaving early",
        {
            f'http_requests_total{{{SEL}, status="200"}}': "0+100x420",
            f'http_requests_total{{{SEL}, status="499"}}': "0+10x420",
        },
        "7h",
        quiet=("ItemstreamErrorBudgetBurnFast", "ItemstreamErrorBudgetBurnSlow"),
    ),
    # A short burst (10 minutes of errors) pages only while the hour window agrees.
    Scenario(
        "a burst long past",
        {
            f'http_requests_total{{{SEL}, status="200"}}': "0+100x420",
            f'http_requests_total{{{SEL}, status="500"}}': "0+50x10 500+0x410",
        },
        "7h",
        quiet=("ItemstreamErrorBudgetBurnFast", "ItemstreamErrorBudgetBurnSlow"),
    ),
    # Half the requests slower than 0.5 s: both latency alerts (SLO 99 %).
    Scenario(
        "slow for hours",
        _latency(50, 100, 420),
        "7h",
        {"ItemstreamLatencyBudgetBurnFast": JOB, "ItemstreamLatencyBudgetBurnSlow": JOB},
    ),
    Scenario(
        "fast enough",
        _latency(999, 1000, 420),
        "7h",
        quiet=("ItemstreamLatencyBudgetBurnFast", "ItemstreamLatencyBudgetBurnSlow"),
    ),
    # One unavailable-database event a second: page.
    Scenario(
        "database gone",
        {f"itemstream_db_unavailable_total{{{SEL}}}": "0+60x20"},
        "15m",
        {"ItemstreamDatabaseUnavailable": {}},
    ),
    # One a minute (a PgBouncer restart, a dropped connection): no page.
    Scenario(
        "database hiccup",
        {f"itemstream_db_unavailable_total{{{SEL}}}": "0+1x20"},
        "15m",
        quiet=("ItemstreamDatabaseUnavailable",),
    ),
    Scenario(
        "a pod not scraped",
        {f'up{{{SEL}, instance="10.0.0.1:9090"}}': "0x10"},
        "8m",
        {"ItemstreamScrapeFailing": {**JOB, "instance": "10.0.0.1:9090"}},
        quiet=("ItemstreamMetricsAbsent",),
    ),
    Scenario(
        "scraped",
        {f'up{{{SEL}, instance="10.0.0.1:9090"}}': "1x20"},
        "15m",
        quiet=("ItemstreamScrapeFailing", "ItemstreamMetricsAbsent"),
    ),
    Scenario(
        "nothing scraped at all",
        {'up{namespace="other", job="other"}': "1x20"},
        "15m",
        {"ItemstreamMetricsAbsent": JOB},
    ),
    Scenario(
        "no ready pod",
        {
            f'kube_deployment_status_replicas_available{{namespace="{NAMESPACE}", '
            f'deployment="{RELEASE}"}}': "2x2 0x10"
        },
        "10m",
        {"ItemstreamNoReadyPods": {"namespace": NAMESPACE, "deployment": RELEASE}},
    ),
    Scenario(
        "ready pods",
        {
            f'kube_deployment_status_replicas_available{{namespace="{NAMESPACE}", '
            f'deployment="{RELEASE}"}}': "2x10"
        },
        "10m",
        quiet=("ItemstreamNoReadyPods",),
    ),
    Scenario(
        "HPA pinned at its maximum",
        _hpa(current=10, maximum=10),
        "18m",
        {
            "ItemstreamHPAAtMaxReplicas": {
                "namespace": NAMESPACE,
                "horizontalpodautoscaler": RELEASE,
            }
        },
    ),
    Scenario("HPA with headroom", _hpa(4, 10), "18m", quiet=("ItemstreamHPAAtMaxReplicas",)),
    Scenario(
        "clients queue in PgBouncer",
        {f'pgbouncer_pools_client_waiting_connections{{namespace="{NAMESPACE}"}}': "3x10"},
        "8m",
        {"ItemstreamPgBouncerClientsWaiting": {}},
    ),
    Scenario(
        "PgBouncer keeps up",
        {f'pgbouncer_pools_client_waiting_connections{{namespace="{NAMESPACE}"}}': "0x10"},
        "8m",
        quiet=("ItemstreamPgBouncerClientsWaiting",),
    ),
    # Every acquisition waits between 0.25 and 0.5 s: p95 far above 100 ms.
    Scenario(
        "pool exhausted",
        {POOL % "0.1": "0x20", POOL % "0.5": "0+10x20", POOL % "+Inf": "0+10x20"},
        "18m",
        {"ItemstreamDBPoolSaturated": {}},
    ),
    Scenario(
        "pool fine",
        {POOL % "0.1": "0+10x20", POOL % "0.5": "0+10x20", POOL % "+Inf": "0+10x20"},
        "18m",
        quiet=("ItemstreamDBPoolSaturated",),
    ),
    Scenario(
        "upstream failing",
        {
            f'itemstream_upstream_errors_total{{{SEL}, kind="timeout"}}': "0+10x20",
            f"itemstream_streams_total{{{SEL}}}": "0+50x20",
        },
        "18m",
        {"ItemstreamUpstreamErrors": {}},
    ),
    Scenario(
        "upstream fine",
        {
            f'itemstream_upstream_errors_total{{{SEL}, kind="timeout"}}': "0+1x20",
            f"itemstream_streams_total{{{SEL}}}": "0+500x20",
        },
        "18m",
        quiet=("ItemstreamUpstreamErrors",),
    ),
]


def _test_file(rules: dict[str, Any]) -> dict[str, Any]:
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = []
    for scenario in SCENARIOS:
        cases = [
            {
                "eval_time": scenario.at,
                "alertname": name,
                "exp_alerts": [
                    {
                        "exp_labels": {**alerts[name]["labels"], **extra},
                        "exp_annotations": alerts[name]["annotations"],
                    }
                ],
            }
            for name, extra in scenario.fires.items()
        ]
        cases += [
            {"eval_time": scenario.at, "alertname": name, "exp_alerts": []}
            for name in scenario.quiet
        ]
        tests.append(
            {
                "name": scenario.name,
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in scenario.series.items()],
                "alert_rule_test": cases,
            }
        )
    return {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}


def test_every_alert_has_a_firing_and_a_quiet_scenario() -> None:
    rules = rendered_rules(RELEASE, NAMESPACE)
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    firing = {name for s in SCENARIOS for name in s.fires}
    quiet = {name for s in SCENARIOS for name in s.quiet}
    assert firing == alerts, alerts ^ firing
    assert quiet == alerts, alerts ^ quiet


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        missing("promtool not found (from Debian's prometheus package; `make test` installs it)")
    assert promtool is not None
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, check=False)


def test_alerts_with_promtool(tmp_path: Path) -> None:
    rules = rendered_rules(RELEASE, NAMESPACE)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    checked = _promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    count = sum(len(group["rules"]) for group in rules["groups"])
    assert f"SUCCESS: {count} rules found" in checked.stdout, checked.stdout + checked.stderr
    (tmp_path / "alerts_test.yaml").write_text(yaml.safe_dump(_test_file(rules), width=1000))
    result = _promtool("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("threshold", ["2"])
def test_database_alert_threshold_is_a_value(threshold: str) -> None:
    out = helm(
        "template",
        RELEASE,
        str(CHART),
        *values_args(
            None,
            [
                "prometheusRule.enabled=true",
                f"prometheusRule.databaseUnavailablePerSecond={threshold}",
            ],
        ),
        "--show-only",
        "templates/prometheusrule.yaml",
    ).stdout
    assert f"[5m])) > {threshold}" in out
