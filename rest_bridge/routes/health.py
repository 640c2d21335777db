"""`GET /health` (engine readiness, for load balancers) and `GET /ping` (bridge liveness)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from rest_bridge.errors import error_envelope
from rest_bridge.openai_schemas.responses import ErrorResponse
from rest_bridge.routes.common import RouteContext

router = APIRouter()


@router.get("/health", responses={503: {"model": ErrorResponse}})
async def health(request: Request) -> Response:
    """200 once the engine reports its Inference service SERVING (model loaded), else 503."""
    ctx = RouteContext.of(request)
    if await ctx.client.check_ready(timeout=ctx.settings.health_timeout):
        return Response(status_code=200)
    return JSONResponse(
        error_envelope("the engine is not ready", "service_unavailable_error"), status_code=503
    )


@router.get("/ping")
async def ping() -> Response:
    """The bridge process is up, whatever the engine's state."""
    return Response(status_code=200)
