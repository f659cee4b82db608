from __future__ import annotations

from functools import cache

from fastapi import APIRouter
from starlette.responses import JSONResponse

from app import __version__, build_revision
from app.api.deps import HealthServiceDep
from app.api.schemas import Liveness, Status
from app.telemetry import tracing

router = APIRouter(tags=["health"])


@router.get("/livez", summary="Process is alive (no I/O), and the version it runs")
async def livez() -> Liveness:
    return Liveness(status="ok", version=__version__, revision=_revision())


@cache
def _revision() -> str:
    return build_revision()


@router.get(
    "/readyz",
    summary="Ready for traffic: database reachable through the app's pool, schema at head",
    responses={200: {"model": Status}, 503: {"model": Status}},
)
async def readyz(health: HealthServiceDep) -> JSONResponse:
    with tracing.untraced():
        result = await health.readiness()
    body = {"status": "ok" if result.ready else "unavailable", "detail": result.detail}
    return JSONResponse(body, status_code=200 if result.ready else 503)
