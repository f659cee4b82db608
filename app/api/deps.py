"""Dependency wiring. All dependencies are `async def`: a sync one would cost a thread hop."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request

from app.api.security import AccessControl
from app.config import Settings
from app.lifecycle import Lifecycle
from app.services.generations import GenerationService
from app.services.health import HealthService
from app.services.items import ItemService


@dataclass(slots=True)
class Services:
    settings: Settings
    items: ItemService
    health: HealthService
    generations: GenerationService
    lifecycle: Lifecycle
    access: AccessControl


async def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def _items(request: Request) -> ItemService:
    services: Services = request.app.state.services
    return services.items


async def _health(request: Request) -> HealthService:
    services: Services = request.app.state.services
    return services.health


ServicesDep = Annotated[Services, Depends(_services)]
ItemServiceDep = Annotated[ItemService, Depends(_items)]
HealthServiceDep = Annotated[HealthService, Depends(_health)]

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


async def _if_match(
    if_match: Annotated[
        str | None,
        Header(
            description='`*` or entity tags from previous responses, e.g. "3" (RFC 9110 '
            "13.1.1; anything else is 400). A version the item is not at gets 412",
        ),
    ] = None,
) -> frozenset[int] | None:
    return parse_if_match(if_match)


IfMatch = Annotated[frozenset[int] | None, Depends(_if_match)]


def etag(version: int) -> str:
    return f'"{version}"'
