"""Render the chart with the real Helm 4 binary and look at what it produced."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from scripts.install_helm import installed
from tests.support.skips import missing

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "chart"


def helm_binary() -> str:
    found = installed()
    if not found:
        missing("helm 4 not found; run `make test` (installs it) or set HELM")
    assert found is not None
    return found


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [helm_binary(), *args], capture_output=True, text=True, timeout=120, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result


# None: the chart's defaults as the try-out in chart/README.md installs them, with the one
# opt-in the chart requires for that (no authentication in production); the bare defaults
# refuse to render (tests/test_chart.py::test_bare_defaults_refuse_an_unauthenticated_install).
TRY_OUT = "try-out-values.yaml"


def values_args(values_file: str | None, sets: Iterable[str] = ()) -> list[str]:
    args = ["-f", str(CHART / "ci" / (values_file or TRY_OUT))]
    for item in sets:
        args += ["--set", item]
    return args


@dataclass
class Rendered:
    objects: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for obj in self.objects:
            if obj["kind"] == kind and obj["metadata"]["name"] == name:
                return obj
        raise KeyError(f"no {kind} {name} in {[o['metadata']['name'] for o in self.objects]}")

    def one(self, kind: str, component: str) -> dict[str, Any]:
        found = [
            o
            for o in self.of_kind(kind)
            if o["metadata"]["labels"].get("app.kubernetes.io/component") == component
        ]
        assert len(found) == 1, f"{len(found)} {kind} objects for {component}"
        return found[0]


def render(
    values_file: str | None = None, *sets: str, release: str = "demo", namespace: str = "apps"
) -> Rendered:
    out = helm(
        "template",
        release,
        str(CHART),
        "--namespace",
        namespace,
        *values_args(values_file, sets),
    ).stdout
    return Rendered([doc for doc in yaml.safe_load_all(out) if doc])


def render_error(values_file: str | None = None, *sets: str) -> str:
    result = helm("template", "demo", str(CHART), *values_args(values_file, sets), check=False)
    assert result.returncode != 0, "rendering should have failed"
    return result.stderr


def rendered_rules(
    release: str = "itemstream", namespace: str = "apps", sets: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The spec of the chart's PrometheusRule (its rule groups), as Helm renders it."""
    from harness.fleet import chart_rules

    return chart_rules(helm_binary(), release, namespace, sets)
