"""The release script's pure rules: the packaged values name the released image exactly (for
any registry and repository text), versions compare across semver and PEP 440, dpkg's status
file parses, and `bump` writes the version everywhere it is declared."""

from __future__ import annotations

import datetime as dt
import shutil
import tomllib
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from scripts.chart_version import SEMVER
from scripts.release import Target, bump, parse_dpkg_status, pin_image, same_version

ROOT = Path(__file__).resolve().parents[2]
VALUES = (ROOT / "chart" / "values.yaml").read_text()

text = st.text(st.characters(codec="utf-8"), max_size=40)  # utf-8: no lone surrogates


@given(registry=text, repository=text, tag=text)
def test_pinned_values_name_exactly_the_released_image(
    registry: str, repository: str, tag: str
) -> None:
    digest = "sha256:" + "ab" * 32
    pinned = pin_image(VALUES, registry, repository, tag, digest)
    image = yaml.safe_load(image_block(pinned))["image"]
    assert (image["registry"], image["repository"], image["tag"], image["digest"]) == (
        registry,
        repository,
        tag,
        digest,
    )
    unpinned, changed = VALUES.splitlines(), pinned.splitlines()
    assert len(unpinned) == len(changed), "comments and layout kept"
    differ = [i for i, (a, b) in enumerate(zip(unpinned, changed, strict=True)) if a != b]
    block = range(unpinned.index("image:"), unpinned.index("image:") + 12)
    assert len(differ) <= 4 and all(i in block for i in differ), "only the app's image block"


def image_block(values: str) -> str:
    lines = values.splitlines(keepends=True)
    start = lines.index("image:\n")
    end = next(
        i for i in range(start + 1, len(lines)) if lines[i].strip() and lines[i][0] not in " #"
    )
    return "".join(lines[start:end])


def test_the_whole_pinned_values_file_still_parses() -> None:
    pinned = pin_image(VALUES, "ghcr.io", "team/itemstream", "1.2.0", "sha256:" + "cd" * 32)
    values, original = yaml.safe_load(pinned), yaml.safe_load(VALUES)
    assert values["image"]["digest"] == "sha256:" + "cd" * 32
    assert {k: v for k, v in values.items() if k != "image"} == {
        k: v for k, v in original.items() if k != "image"
    }


def test_versions_compare_across_semver_and_python() -> None:
    assert same_version("1.2.0-rc.1", "1.2.0rc1")
    assert same_version("1.2.0", "1.2.0")
    assert not same_version("1.2.0-rc.1", "1.2.0")
    assert not same_version("0.0.0-test", "0.0.0")  # not a Python version at all


def test_targets_speak_plain_http_only_on_loopback() -> None:
    assert Target("127.0.0.1:5000", "1.0.0", "0.2.0").plain_http
    assert Target("localhost:5000/team", "1.0.0", "0.2.0").plain_http
    remote = Target("ghcr.io/itemstream", "1.0.0", "0.2.0")
    assert not remote.plain_http and remote.tls("tls-verify") == []
    assert remote.image == "ghcr.io/itemstream/itemstream:1.0.0"
    assert remote.chart_repository == "oci://ghcr.io/itemstream/charts"


def test_dpkg_status_keeps_installed_packages_only() -> None:
    status = (
        "Package: libc6\nStatus: install ok installed\nVersion: 2.36-9\nArchitecture: amd64\n"
        "Description: GNU C Library\n multi-line text: not a field\n\n"
        "Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n"
    )
    assert [(p["Package"], p["Version"]) for p in parse_dpkg_status(status)] == [
        ("libc6", "2.36-9")
    ]


def test_bump_writes_the_version_everywhere_it_is_declared(tmp_path: Path) -> None:
    for name in ("pyproject.toml", "uv.lock", "Dockerfile", "CHANGELOG.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "chart").mkdir()
    shutil.copy(ROOT / "chart" / "Chart.yaml", tmp_path / "chart" / "Chart.yaml")
    chart_version = yaml.safe_load((ROOT / "chart" / "Chart.yaml").read_text())["version"]

    bump("7.8.9-rc.2", tmp_path, today=dt.date(2026, 12, 5))
    assert tomllib.loads((tmp_path / "pyproject.toml").read_text())["project"]["version"] == (
        "7.8.9-rc.2"
    )
    lock = tomllib.loads((tmp_path / "uv.lock").read_text())
    assert {p["version"] for p in lock["package"] if p["name"] == "itemstream"} == {"7.8.9-rc.2"}
    assert "ARG VERSION=7.8.9-rc.2" in (tmp_path / "Dockerfile").read_text()
    meta = yaml.safe_load((tmp_path / "chart" / "Chart.yaml").read_text())
    assert meta["appVersion"] == "7.8.9-rc.2" and meta["version"] == chart_version
    changelog = (tmp_path / "CHANGELOG.md").read_text()
    assert "## [Unreleased]\n\n## [7.8.9-rc.2] - 2026-12-05\n" in changelog


@given(version=st.text(max_size=30))
def test_any_version_text_is_released_or_refused_by_name(version: str) -> None:
    """VERSION comes from a command line: any text is either semver or refused naming what it
    must be, before any file is read or written."""
    from scripts.release import ReleaseError, release_problems

    if SEMVER.match(version):
        return
    assert "is not semver" in release_problems(version, Path("/nonexistent"))[0]
    with pytest.raises(ReleaseError, match="is not semver"):
        bump(version, Path("/nonexistent"))
