"""Shared by the generators of checked-in files: write the file, or with --check say whether
it is up to date (the tests run the check)."""

from __future__ import annotations

import sys
from pathlib import Path


def write_or_check(target: Path, text: str, command: str) -> int:
    if "--check" in sys.argv:
        if target.read_text() != text:
            print(f"{target.name} is out of date: run {command}", file=sys.stderr)
            return 1
        return 0
    target.write_text(text)
    return 0
