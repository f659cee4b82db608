"""The chart's version discipline (chart-testing's rule, against release tags): a released
chart version never changes. A release is the git tag `<name>-<version>` (what
`helm package` names the archive and chart-releaser names the tag). So:

- when the tag of Chart.yaml's version exists, nothing under chart/ may differ from it: a
  change needs a new version;
- the version is semver and higher than every released one;
- the version says what changed in it (`artifacthub.io/changes`, which Artifact Hub shows).

    uv run python scripts/chart_version.py     # exit 1 with the reasons when the rule is broken
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")


def _git(repo: Path, *args: str) -> str:
    git = shutil.which("git")
    assert git is not None, "git is not installed"
    return subprocess.run([git, *args], cwd=repo, capture_output=True, text=True, check=True).stdout


def _key(version: str) -> tuple[int, int, int, int]:
    match = SEMVER.match(version)
    assert match is not None
    major, minor, patch, pre = match.groups()
    return int(major), int(minor), int(patch), 0 if pre else 1  # a pre-release sorts first


def problems(repo: Path = ROOT, chart: str = "chart") -> list[str]:
    meta = yaml.safe_load((repo / chart / "Chart.yaml").read_text())
    name, version = meta["name"], str(meta["version"])
    if not SEMVER.match(version):
        return [f"{chart}/Chart.yaml version {version!r} is not semver"]
    found = []
    changes = yaml.safe_load(meta.get("annotations", {}).get("artifacthub.io/changes") or "[]")
    if not changes:
        found.append(f"{chart}/Chart.yaml: say what changed in {version} (artifacthub.io/changes)")
    released = [
        tag.removeprefix(f"{name}-")
        for tag in _git(repo, "tag", "--list", f"{name}-*").split()
        if SEMVER.match(tag.removeprefix(f"{name}-"))
    ]
    tag = f"{name}-{version}"
    if version in released:
        # Committed and uncommitted changes alike: what would be packaged now.
        changed = _git(repo, "diff", "--name-only", tag, "--", chart).split()
        changed += _git(repo, "ls-files", "--others", "--exclude-standard", "--", chart).split()
        if changed:
            found.append(
                f"{chart}/ changed since {tag} was released ({', '.join(sorted(changed)[:5])}):"
                f" give {chart}/Chart.yaml a new version"
            )
    else:
        newer = [v for v in released if _key(v) >= _key(version)]
        if newer:
            found.append(f"version {version} is not above the released {max(newer, key=_key)}")
    return found


def main() -> int:
    found = problems()
    for problem in found:
        print(f"chart version: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
