"""Entity tags, in one place: an item's ETag is its version, quoted; If-Match is compared
strongly (RFC 9110 13.1.1) and If-None-Match weakly (13.1.2)."""

from __future__ import annotations

import re

from starlette.exceptions import HTTPException


def etag(version: int) -> str:
    return f'"{version}"'


_ETAG = re.compile(r'\s*(W/)?"([^"]*)"\s*(?:,|$)')


def parse_if_match(value: str | None) -> frozenset[int] | None:
    """None means "no precondition" (header absent or `*`, which any existing item meets).
    Weak tags never match under If-Match's strong comparison."""
    if value is None or value.strip() == "*":
        return None
    versions: set[int] = set()
    position = 0
    text = value.strip()
    while position < len(text):
        match = _ETAG.match(text, position)
        if match is None or match.end() == position:
            raise HTTPException(400, "If-Match must be * or a list of quoted entity tags")
        weak, tag = match.groups()
        if not weak and tag.isdigit():
            versions.add(int(tag))
        position = match.end()
    return frozenset(versions)


def none_match_fails(header: str, version: int) -> bool:
    """`*` matches any current representation; otherwise a weak comparison against the
    listed tags."""
    tags = {part.strip().removeprefix("W/") for part in header.split(",")}
    return "*" in tags or etag(version) in tags
