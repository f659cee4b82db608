"""The chart's release discipline: a released version never changes (scripts/chart_version.py,
chart-testing's rule against release tags), Chart.yaml says what Artifact Hub and a platform
team need, and the hand-edited YAML passes yamllint."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from scripts.chart_version import problems

ROOT = Path(__file__).resolve().parents[1]
YAML_FILES = [
    "chart/values.yaml",
    "chart/values-dev.yaml",
    "chart/ci",
    "chart/Chart.yaml",
    "skaffold.yaml",
    "k8s",
    "compose.yaml",
    ".yamllint.yaml",
]


def test_this_checkout_keeps_the_rule() -> None:
    assert problems() == []


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def _set_version(repo: Path, version: str) -> None:
    chart = repo / "chart" / "Chart.yaml"
    text = chart.read_text()
    current = yaml.safe_load(text)["version"]
    chart.write_text(text.replace(f"version: {current}", f"version: {version}", 1))


def test_a_change_to_a_released_chart_needs_a_new_version(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "chart", repo / "chart")
    _git(repo, "init", "-q")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "chart")
    _set_version(repo, "1.4.0")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "1.4.0")
    _git(repo, "tag", "itemstream-1.4.0")
    assert problems(repo) == [], "the released version, unchanged"

    deployment = repo / "chart" / "templates" / "deployment.yaml"
    deployment.write_text(deployment.read_text() + "\n# a change\n")
    assert any("changed since itemstream-1.4.0" in p for p in problems(repo))
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "template")
    assert any("changed since itemstream-1.4.0" in p for p in problems(repo)), "committed too"

    _set_version(repo, "1.3.9")
    assert any("not above the released 1.4.0" in p for p in problems(repo))
    _set_version(repo, "1.5.0")
    assert problems(repo) == [], "a new version for the change"

    chart = repo / "chart" / "Chart.yaml"
    meta = yaml.safe_load(chart.read_text())
    del meta["annotations"]["artifacthub.io/changes"]
    chart.write_text(yaml.safe_dump(meta))
    assert any("artifacthub.io/changes" in p for p in problems(repo))


def test_chart_yaml_has_what_a_platform_team_looks_for() -> None:
    meta = yaml.safe_load((ROOT / "chart" / "Chart.yaml").read_text())
    for field in ("home", "icon", "sources", "maintainers", "kubeVersion", "appVersion"):
        assert meta.get(field), field
    assert meta["icon"].startswith("https://") and meta["icon"].endswith("/chart/icon.svg")
    assert (ROOT / "chart" / "icon.svg").exists(), "the icon the URL names"
    for change in yaml.safe_load(meta["annotations"]["artifacthub.io/changes"]):
        assert change["kind"] in {"added", "changed", "deprecated", "removed", "fixed", "security"}
        assert change["description"]


def test_hand_edited_yaml_passes_yamllint() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "yamllint", "-f", "parsable", *YAML_FILES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_production_values_pin_every_image_by_digest() -> None:
    """What production installs is immutable: with the app's digest as a release writes it,
    every container (hooks and `helm test` included) names its image by digest."""
    from tests.support.helm import render
    from tests.test_chart import pod_specs

    digest = "sha256:" + "0" * 64
    rendered = render("production-values.yaml", f"image.digest={digest}")
    images = {
        container["image"]
        for _, spec in pod_specs(rendered)
        for container in spec.get("initContainers", []) + spec["containers"]
    }
    assert len(images) >= 4, images  # app, PgBouncer, its exporter, the test pod
    assert all(re.search(r"@sha256:[0-9a-f]{64}$", image) for image in images), images


def test_the_default_pgbouncer_has_the_2026_security_fixes() -> None:
    """PgBouncer 1.25.2 fixes CVE-2026-6664/6665/6666; the chart and compose never default
    to an older one."""
    values = yaml.safe_load((ROOT / "chart" / "values.yaml").read_text())
    tags = [values["pgbouncer"]["image"]["tag"]]
    tags += re.findall(r"edoburu/pgbouncer:(\S+)", (ROOT / "compose.yaml").read_text())
    for tag in tags:
        match = re.match(r"^v?(\d+)\.(\d+)\.(\d+)", tag)
        assert match and tuple(map(int, match.groups())) >= (1, 25, 2), tag
