"""Dependency wiring. All dependencies are `async def`: a sync one would cost a thread hop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Header, Request

from app.api.access import AccessControl, authorize, scoped
from app.api.etags import parse_if_match
from app.config import Settings
from app.domain.principal import READ, WRITE, Principal
from app.lifecycle import Lifecycle
from app.services.generations import GenerationService
from app.services.health import HealthService
from app.services.items import ItemService


@dataclass(slots=True)
class Components:
    """What a worker wires at start (app.main.build_components) and routes reach through the
    dependencies below: the services, and the settings, lifecycle and access control."""

    settings: Settings
    items: ItemService
    health: HealthService
    generations: GenerationService
    lifecycle: Lifecycle
    access: AccessControl


async def _components(request: Request) -> Components:
    components: Components = request.app.state.components
    return components


S = TypeVar("S")


@dataclass(frozen=True, slots=True)
class Authorized(Generic[S]):
    """A service and the caller it acts for (whose tenant confines what it reaches)."""

    service: S
    caller: Principal


def _items_for(scope: str) -> Any:
    # One dependency for access and the service: each one FastAPI solves costs per request.
    async def items_for_caller(request: Request) -> Authorized[ItemService]:
        caller = await authorize(request, scope)
        components: Components = request.app.state.components
        return Authorized(components.items, caller)

    return scoped(items_for_caller, scope)


async def _health(request: Request) -> HealthService:
    components: Components = request.app.state.components
    return components.health


ComponentsDep = Annotated[Components, Depends(_components)]
# The items service and its caller, who may read (write) items and is within the rate limit.
ItemsReader = Annotated[Authorized[ItemService], _items_for(READ)]
ItemsWriter = Annotated[Authorized[ItemService], _items_for(WRITE)]
HealthServiceDep = Annotated[HealthService, Depends(_health)]


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
