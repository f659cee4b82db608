"""An earlier release of the service, checked out beside this one, to serve next to it: what a
rolling upgrade runs (the previous release's pods while the migration runs and the new pods
start). The release is a commit of this repository's history; it runs with this checkout's
virtual environment (its dependencies are the locked ones of the releases compared)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The last commit before tenancy (migration 0004): the release an existing deployment runs
# when it upgrades to tenancy.
BEFORE_TENANCY = "fa39856adc6b99cf282b9146db7d8a18fc0705e5"


class ReleaseUnavailable(RuntimeError):
    """The commit is not in this clone (a shallow clone, or history rewritten)."""


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    git = shutil.which("git") or "git"
    return subprocess.run(
        [git, *args], cwd=ROOT, capture_output=True, text=True, check=False, timeout=120
    )


def require(commit: str) -> None:
    """Raise ReleaseUnavailable unless `commit` can be checked out here."""
    if shutil.which("git") is None or _git("cat-file", "-e", f"{commit}^{{commit}}").returncode:
        raise ReleaseUnavailable(
            f"commit {commit[:12]} is not in this clone (a shallow clone? fetch the history)"
        )


@contextmanager
def checked_out(commit: str) -> Iterator[Path]:
    """The tree of `commit` in a temporary directory (a detached git worktree), removed after."""
    require(commit)
    where = Path(tempfile.mkdtemp(prefix="itemstream-release-")) / "tree"
    added = _git("worktree", "add", "--detach", "--force", str(where), commit)
    if added.returncode:
        raise ReleaseUnavailable(f"git worktree add failed: {added.stderr.strip()}")
    try:
        yield where
    finally:
        _git("worktree", "remove", "--force", str(where))
        shutil.rmtree(where.parent, ignore_errors=True)
        _git("worktree", "prune")
