"""Generate chart/values.schema.json from values.yaml: types inferred from the defaults, then
the constraints a type cannot say (enums, ranges, patterns, cross-field rules).

    uv run python scripts/chart_schema.py          # rewrite the schema
    uv run python scripts/chart_schema.py --check  # exit 1 when it is out of date
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from anywhere
from scripts.generated import write_or_check

CHART = Path(__file__).resolve().parents[1] / "chart"
# Passed through to Kubernetes objects as they are: any keys allowed.
OPEN = {
    "commonLabels", "podAnnotations", "podLabels", "nodeSelector", "affinity", "annotations",
    "labels", "extraSettings", "customStartupProbe", "customLivenessProbe",
    "customReadinessProbe", "behavior", "resources", "podSecurityContext",
    "containerSecurityContext", "securityContext",
}  # fmt: skip


def infer(value: Any, key: str = "") -> dict[str, Any]:
    if key in OPEN:
        return {"type": "object"}
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, int):
        return {"type": "integer"}
    if isinstance(value, float):
        return {"type": "number"}
    if isinstance(value, str):
        return {"type": "string"}
    if value is None:
        return {"type": ["integer", "null"]}
    if isinstance(value, list):
        return {"type": "array"}
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {k: infer(v, k) for k, v in value.items()},
    }


def port(node: dict[str, Any]) -> None:
    node.update(minimum=1, maximum=65535)


def _prometheus_rule(rule: dict[str, Any]) -> None:
    rule["availabilitySLO"].update(exclusiveMinimum=0, exclusiveMaximum=1)
    rule["latencySLO"].update(exclusiveMinimum=0, exclusiveMaximum=1)
    rule["latencyThresholdSeconds"]["enum"] = [
        "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0",
    ]  # fmt: skip
    for duration in ("databaseUnavailableWindow", "databaseUnavailableFor"):
        rule[duration]["pattern"] = "^([0-9]+(ms|s|m|h))+$"  # a Prometheus duration


def _external_database(p: dict[str, Any]) -> None:
    p["sslmode"]["enum"] = ["disable", "prefer", "require", "verify-ca", "verify-full"]
    p["hosts"]["items"] = {"type": "string", "minLength": 1}


def schema() -> dict[str, Any]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    out = infer(values)
    p = out["properties"]
    p["global"]["additionalProperties"] = True  # parent charts pass their own globals
    # A parent chart's `condition: itemstream.enabled` passes `enabled` down.
    p["enabled"] = {"type": "boolean", "description": "set by a parent chart's condition"}
    m = p["migrations"]["properties"]
    m["ttlSecondsAfterFinished"] = {"type": ["integer", "null"], "minimum": 0}
    m["databaseWaitSeconds"]["minimum"] = 0
    m["tolerations"]["items"] = {"type": "object"}
    p["environment"]["enum"] = ["development", "test", "production"]
    p["logLevel"]["enum"] = ["DEBUG", "INFO", "WARNING", "ERROR"]
    p["replicaCount"]["minimum"] = 1
    p["args"]["items"] = {"type": "string"}
    p["gunicorn"]["properties"]["workers"] = {
        "type": ["integer", "null"],
        "minimum": 1,
        "maximum": 64,
    }
    # Empty: derived from the others (chart/templates/_helpers.tpl, shutdown timings).
    p["gunicorn"]["properties"]["gracefulTimeout"] = {"type": ["integer", "null"], "minimum": 6}
    p["terminationGracePeriodSeconds"] = {"type": ["integer", "null"], "minimum": 1}
    p["llm"]["properties"]["provider"]["enum"] = ["mock", "openai"]
    p["tracing"]["properties"]["protocol"]["enum"] = ["http/protobuf"]
    p["tracing"]["properties"]["samplerArg"] = {"type": ["string", "number"]}
    p["migrations"]["properties"]["mode"]["enum"] = ["hook", "job", "initContainer", "none"]
    p["pgbouncer"]["properties"]["appMode"]["enum"] = ["pgbouncer", "pgbouncer-legacy"]
    _external_database(p["externalDatabase"]["properties"])
    p["service"]["properties"]["nodePort"] = {
        "type": ["integer", "null"],
        "minimum": 30000,
        "maximum": 32767,
    }
    p["service"]["properties"]["type"]["enum"] = ["ClusterIP", "NodePort", "LoadBalancer"]
    p["image"]["properties"]["pullPolicy"]["enum"] = ["Always", "IfNotPresent", "Never"]
    p["image"]["properties"]["digest"]["pattern"] = "^(sha256:[a-f0-9]{64})?$"
    for node in (
        p["containerPort"],
        p["metrics"]["properties"]["port"],
        p["service"]["properties"]["port"],
        p["pgbouncer"]["properties"]["port"],
        p["externalDatabase"]["properties"]["port"],
        p["pgbouncer"]["properties"]["external"]["properties"]["port"],
    ):
        port(node)
    a = p["autoscaling"]["properties"]
    a["minReplicas"]["minimum"] = 1
    a["maxReplicas"]["minimum"] = 1
    a["targetCPUUtilizationPercentage"].update(minimum=1, maximum=100)
    a["targetMemoryUtilizationPercentage"] = {
        "type": ["integer", "null"],
        "minimum": 1,
        "maximum": 100,
    }
    a["inFlightRequests"]["properties"]["averageValue"] = {"type": ["string", "integer"]}
    p["config"]["properties"]["dbPoolSize"]["minimum"] = 1
    p["config"]["properties"]["dbMaxOverflow"]["minimum"] = 0
    p["config"]["properties"]["corsAllowOrigins"]["items"] = {"type": "string"}
    p["postgresql"]["properties"]["persistence"]["properties"]["size"] = {"type": "string"}
    p["pgbouncer"]["properties"]["maxPreparedStatements"]["minimum"] = 0
    for image in (
        p["image"],
        p["pgbouncer"]["properties"]["image"],
        p["pgbouncer"]["properties"]["metrics"]["properties"]["image"],
        p["postgresql"]["properties"]["image"],
        p["tests"]["properties"]["image"],
    ):
        image["properties"]["tag"] = {"type": ["string", "number"]}
    p["streams"]["properties"]["drainSeconds"] = {"type": ["number", "null"], "minimum": 0}
    p["auth"]["properties"]["mode"]["enum"] = ["none", "jwt", "hs256"]
    p["rateLimit"]["properties"]["failMode"]["enum"] = ["open", "closed"]
    for name in ("requests", "windowSeconds", "tokens", "tokensWindowSeconds", "streams"):
        p["rateLimit"]["properties"][name]["minimum"] = 1
    p["security"]["properties"]["allowedHosts"]["items"] = {"type": "string"}
    p["redis"]["properties"]["image"]["properties"]["tag"] = {"type": ["string", "number"]}
    _prometheus_rule(p["prometheusRule"]["properties"])
    out["allOf"] = [
        {  # an external database needs its host, or its hosts
            "if": {"properties": {"postgresql": {"properties": {"enabled": {"const": False}}}}},
            "then": {
                "properties": {
                    "externalDatabase": {
                        "anyOf": [
                            {"required": ["host"], "properties": {"host": {"minLength": 1}}},
                            {"required": ["hosts"], "properties": {"hosts": {"minItems": 1}}},
                        ]
                    }
                }
            },
        },
        {  # a real upstream needs its URL
            "if": {"properties": {"llm": {"properties": {"provider": {"const": "openai"}}}}},
            "then": {
                "properties": {
                    "llm": {"properties": {"baseUrl": {"minLength": 1, "pattern": "^https?://"}}}
                }
            },
        },
    ]
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "itemstream chart values",
        **out,
    }


def main() -> int:
    text = json.dumps(schema(), indent=2) + "\n"
    return write_or_check(CHART / "values.schema.json", text, "scripts/chart_schema.py")


if __name__ == "__main__":
    raise SystemExit(main())
