"""Generate chart/files/dashboard.json, the Grafana dashboard the chart ships.

Kept as code so panels stay consistent (one datasource variable, one namespace/job filter)
and the metric names are easy to check against a real scrape (tests/test_observability.py).

    uv run python scripts/grafana_dashboard.py          # rewrite the file
    uv run python scripts/grafana_dashboard.py --check  # exit 1 when it is out of date
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from anywhere
from scripts.generated import write_or_check

OUT = Path(__file__).resolve().parents[1] / "chart" / "files" / "dashboard.json"
SEL = 'namespace="$namespace", job="$job"'
BOUNCER = 'namespace="$namespace"'


def panel(
    title: str,
    targets: list[tuple[str, str]],
    *,
    unit: str = "short",
    x: int,
    y: int,
    w: int = 12,
    h: int = 8,
    description: str = "",
) -> dict[str, Any]:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom"}},
        "targets": [
            {"refId": chr(65 + i), "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def dashboard() -> dict[str, Any]:
    rows: list[dict[str, Any]] = [
        panel(
            "Request rate by route",
            [
                (
                    f"sum by (handler) (rate(http_requests_total{{{SEL}}}[$__rate_interval]))",
                    "{{handler}}",
                )
            ],
            unit="reqps",
            x=0,
            y=0,
        ),
        panel(
            "Error ratio (5xx)",
            [
                (
                    # No 5xx at all is a ratio of 0, not "no data".
                    f'(sum(rate(http_requests_total{{{SEL}, status=~"5.."}}[$__rate_interval]))'
                    " or vector(0))"
                    f" / sum(rate(http_requests_total{{{SEL}}}[$__rate_interval]))",
                    "5xx / all",
                )
            ],
            unit="percentunit",
            x=12,
            y=0,
        ),
        panel(
            "Latency by route (p50, p95, p99)",
            [
                (
                    f"histogram_quantile({q}, sum by (handler, le) "
                    f"(rate(http_request_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))",
                    f"p{int(q * 100)} {{{{handler}}}}",
                )
                for q in (0.5, 0.95, 0.99)
            ],
            unit="s",
            x=0,
            y=8,
            description="Streaming routes count until their first byte.",
        ),
        panel(
            "Requests in flight vs pods",
            [
                (f"sum(itemstream_http_requests_in_flight{{{SEL}}})", "in flight (all pods)"),
                (f"count(count by (pod) (itemstream_http_requests_in_flight{{{SEL}}}))", "pods"),
                (
                    'kube_horizontalpodautoscaler_status_current_replicas{namespace="$namespace", '
                    'horizontalpodautoscaler="$job"}',
                    "HPA replicas (kube-state-metrics)",
                ),
            ],
            x=12,
            y=8,
            description="The HPA's optional Pods metric is the per-pod average of the first line.",
        ),
        panel(
            "Active streams",
            [(f"sum by (pod) (itemstream_streams_active{{{SEL}}})", "{{pod}}")],
            x=0,
            y=16,
        ),
        panel(
            "Time to first token (p50, p95)",
            [
                (
                    f"histogram_quantile({q}, sum by (le) (rate("
                    f"itemstream_stream_time_to_first_token_seconds_bucket{{{SEL}}}[$__rate_interval])))",
                    f"p{int(q * 100)}",
                )
                for q in (0.5, 0.95)
            ],
            unit="s",
            x=12,
            y=16,
        ),
        panel(
            "Tokens per second",
            [
                (
                    f"sum by (provider) (rate(itemstream_stream_tokens_total{{{SEL}}}[$__rate_interval]))",
                    "{{provider}}",
                )
            ],
            x=0,
            y=24,
        ),
        panel(
            "Stream outcomes and upstream errors",
            [
                (
                    f"sum by (outcome) (rate(itemstream_streams_total{{{SEL}}}[$__rate_interval]))",
                    "{{outcome}}",
                ),
                (
                    f"sum by (kind) (rate(itemstream_upstream_errors_total{{{SEL}}}[$__rate_interval]))",
                    "upstream {{kind}}",
                ),
            ],
            unit="ops",
            x=12,
            y=24,
        ),
        panel(
            "DB pool: connections checked out and wait (p95)",
            [
                (
                    f"sum by (pod) (itemstream_db_pool_checked_out_connections{{{SEL}}})",
                    "checked out {{pod}}",
                ),
                (
                    "histogram_quantile(0.95, sum by (le) (rate("
                    f"itemstream_db_pool_acquire_seconds_bucket{{{SEL}}}[$__rate_interval])))",
                    "acquire p95 (s)",
                ),
                (
                    f"sum(rate(itemstream_db_unavailable_total{{{SEL}}}[$__rate_interval]))",
                    "unavailable/s",
                ),
            ],
            x=0,
            y=32,
        ),
        panel(
            "PgBouncer pools (pgbouncer_exporter)",
            [
                (f"sum(pgbouncer_pools_client_active_connections{{{BOUNCER}}})", "clients active"),
                (
                    f"sum(pgbouncer_pools_client_waiting_connections{{{BOUNCER}}})",
                    "clients waiting",
                ),
                (f"sum(pgbouncer_pools_server_active_connections{{{BOUNCER}}})", "servers active"),
                (f"sum(pgbouncer_pools_server_idle_connections{{{BOUNCER}}})", "servers idle"),
            ],
            x=12,
            y=32,
        ),
    ]
    for index, item in enumerate(rows, start=1):
        item["id"] = index
    return {
        "title": "itemstream",
        "uid": "itemstream",
        "tags": ["itemstream", "fastapi", "sse"],
        "timezone": "utc",
        "schemaVersion": 39,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {
                    "name": "namespace",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": "label_values(itemstream_http_requests_in_flight, namespace)",
                },
                {
                    "name": "job",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": 'label_values(itemstream_http_requests_in_flight{namespace="$namespace"}, job)',
                },
            ]
        },
        "panels": rows,
    }


if __name__ == "__main__":
    text = json.dumps(dashboard(), indent=2) + "\n"
    raise SystemExit(write_or_check(OUT, text, "scripts/grafana_dashboard.py"))
