"""The developer loop and the SRE kit: skaffold.yaml and the kind config against their
schemas and against the chart and Dockerfile they refer to; the observability manifests and
the dev values validated like the chart; every metric the dashboard and the alerts use
present in a real scrape of the running service; the alert rules in test_alerts.py."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from app.config import Settings
from harness.pgbouncer import PgBouncer
from harness.postgres import PostgresServer
from harness.processes import free_port, wait_until
from harness.servers import clean_env
from tests.support.app import through, truncate
from tests.support.helm import CHART, helm, rendered_rules
from tests.support.http_servers import FakeUpstream, fake_upstream, running_app

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
# Metrics that come from other exporters, by the names they document:
# prometheus-community/pgbouncer_exporter (README "Metrics") and kube-state-metrics
# (docs/metrics/workload). Neither can run here; everything else is checked against a scrape.
PGBOUNCER_EXPORTER = {
    "pgbouncer_up",
    "pgbouncer_pools_client_active_connections",
    "pgbouncer_pools_client_waiting_connections",
    "pgbouncer_pools_server_active_connections",
    "pgbouncer_pools_server_idle_connections",
    "pgbouncer_pools_client_maxwait_seconds",
}
KUBE_STATE_METRICS = {
    "kube_deployment_status_replicas_available",
    "kube_horizontalpodautoscaler_status_current_replicas",
    "kube_horizontalpodautoscaler_spec_max_replicas",
}


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def dev_render(*sets: str) -> list[dict[str, Any]]:
    args = [
        "template",
        "itemstream-dev",
        str(CHART),
        "-n",
        "itemstream",
        "-f",
        str(CHART / "values-dev.yaml"),
    ]
    for item in sets:
        args += ["--set", item]
    return [doc for doc in yaml.safe_load_all(helm(*args).stdout) if doc]


# --- skaffold and kind ------------------------------------------------------------------------


def apply_patches(config: dict[str, Any], patches: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 as skaffold applies profile patches (add, remove, replace)."""
    result = copy.deepcopy(config)
    for patch in patches:
        *parents, last = [
            p.replace("~1", "/").replace("~0", "~") for p in patch["path"].split("/")[1:]
        ]
        node: Any = result
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key: Any = int(last) if isinstance(node, list) else last
        if patch["op"] == "remove":
            del node[key]
        else:
            assert patch["op"] == "add" or key in node or isinstance(node, list), patch
            node[key] = patch["value"]
    return result


def test_skaffold_config_matches_schema_chart_and_dockerfile() -> None:
    config = load(ROOT / "skaffold.yaml")
    schema = json.loads((K8S / "schemas" / "skaffold-v4beta14.subset.json").read_text())
    jsonschema.validate(config, schema)
    dockerfile = (ROOT / "Dockerfile").read_text()
    values = load(CHART / "values.yaml")
    configs = {"default": config}
    for profile in config["profiles"]:
        patched = apply_patches(config, profile.get("patches", []))
        jsonschema.validate(patched, schema)
        configs[profile["name"]] = patched
    for name, current in configs.items():
        artifact = current["build"]["artifacts"][0]
        assert re.search(rf"^FROM \S+ AS {artifact['docker']['target']}$", dockerfile, re.M), name
        for rule in artifact.get("sync", {}).get("manual", []):
            assert rule["dest"] == "/app" and "WORKDIR /app" in dockerfile
            assert list(ROOT.glob(rule["src"])), rule["src"]
        (release,) = current["deploy"]["helm"]["releases"]
        assert (ROOT / release["chartPath"] / "Chart.yaml").exists()
        for values_file in release["valuesFiles"]:
            assert (ROOT / values_file).exists(), values_file
        for key in release["setValueTemplates"]:
            section, field = key.split(".")
            assert field in values[section], key
    assert configs["runtime-one-pod"]["build"]["artifacts"][0]["docker"]["target"] == "runtime"
    assert "sync" not in configs["runtime-one-pod"]["build"]["artifacts"][0]

    # Port-forwards point at services that exist: the dev release's and the local stack's.
    services = {
        (o["metadata"].get("namespace", "itemstream"), o["metadata"]["name"]): o
        for o in dev_render()
        if o["kind"] == "Service"
    }
    for path in (K8S / "observability").glob("*.yaml"):
        for obj in yaml.safe_load_all(path.read_text()):
            if obj and obj["kind"] == "Service":
                services[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj
    for forward in config["portForward"]:
        service = services[(forward["namespace"], forward["resourceName"])]
        assert forward["port"] in [p["port"] for p in service["spec"]["ports"]], forward


def test_kind_config() -> None:
    config = load(K8S / "kind-config.yaml")
    schema = json.loads((K8S / "schemas" / "kind-cluster-v1alpha4.json").read_text())
    jsonschema.validate(config, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            {**config, "nodes": [{"role": "control-plane", "image": "kindest/node:v1.35.8"}]},
            schema,
        )
    (mapping,) = config["nodes"][0]["extraPortMappings"]
    dev_values = load(CHART / "values-dev.yaml")
    assert mapping["containerPort"] == dev_values["service"]["nodePort"]


def test_observability_manifests_and_dev_values_validate() -> None:
    objects: list[dict[str, Any]] = []
    for path in sorted((K8S / "observability").glob("*.yaml")):
        objects += [o for o in yaml.safe_load_all(path.read_text()) if o]
    objects += dev_render("prometheusRule.enabled=true")
    kinds = {o["kind"] for o in objects}
    assert {"PrometheusRule", "Deployment", "ConfigMap"} <= kinds
    for obj in objects:
        if obj["kind"] == "PrometheusRule":
            continue
        kubernetes_validate.validate(obj, kubernetes_validate.utils.latest_version(), strict=True)
    dashboards = [o for o in objects if o["metadata"]["name"] == "itemstream-dev-dashboard"]
    assert dashboards[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    json.loads(dashboards[0]["data"]["itemstream.json"])


# --- the SRE kit against real metrics ---------------------------------------------------------


def used_metric_names() -> set[str]:
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    expressions += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    expressions += [r["expr"] for g in rendered_rules()["groups"] for r in g["rules"]]
    names: set[str] = set()
    for expr in expressions:
        scraped = re.sub(r"\bitemstream:[\w:]+", "", expr)  # recorded series are not scraped
        names |= set(re.findall(r"\b((?:itemstream|http|pgbouncer|kube)_[a-z_]+)\b", scraped))
    return names


def scraped_names(text: str) -> set[str]:
    return {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


@pytest.mark.postgres
async def test_dashboard_and_alert_metrics_exist_in_a_real_scrape(
    pg: PostgresServer, pgbouncer_modern: PgBouncer, schema_db: str
) -> None:
    await truncate(pg, schema_db)
    async with fake_upstream() as (_, upstream_url):
        settings: Settings = through(
            pgbouncer_modern,
            pg,
            schema_db,
            llm_provider="openai",
            llm_base_url=upstream_url,
            llm_models=FakeUpstream.MODELS,
        )
        async with running_app(settings) as base, httpx.AsyncClient(base_url=base) as client:
            item = await client.post("/v1/items", json={"name": "m", "price": 1})
            await client.get(f"/v1/items/{item.json()['id']}")
            await client.get("/v1/items/00000000-0000-7000-8000-000000000000")
            body = {"model": "normal", "messages": [{"role": "user", "content": "hi"}]}
            assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
            failing = {**body, "model": "fail-500"}
            assert (await client.post("/v1/chat/completions", json=failing)).status_code == 502
            scrape = (await client.get("/metrics")).text
    have = scraped_names(scrape)
    used = used_metric_names()
    ours = {n for n in used if n.startswith(("itemstream_", "http_"))}
    assert ours and not ours - have, f"not in the scrape: {sorted(ours - have)}"
    assert {n for n in used if n.startswith("pgbouncer_")} <= PGBOUNCER_EXPORTER
    assert {n for n in used if n.startswith("kube_")} <= KUBE_STATE_METRICS
    # The latency SLO's threshold is one of the histogram's buckets.
    assert re.search(r'http_request_duration_seconds_bucket\{[^}]*le="0\.5"', scrape)


@pytest.mark.slow
def test_reload_mode_serves_metrics_on_the_metrics_port(tmp_path: Path) -> None:
    """`serve --reload` (the dev loop) has no gunicorn master; METRICS_PORT still works."""
    port, metrics_port = free_port(), free_port()
    env = clean_env(
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", METRICS_PORT=str(metrics_port)
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--reload", "--port", str(port)],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/livez", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(up, 30)
        httpx.get(f"http://127.0.0.1:{port}/v1/items")
        scrape = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert 'http_requests_total{handler="/v1/items"' in scrape
    finally:
        proc.terminate()
        proc.wait(20)
