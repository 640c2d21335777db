"""`GET /health` (engine readiness, for load balancers) and `GET /ping` (bridge liveness)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from rest_bridge.errors import error_envelope
from rest_bridge.openai_schemas.responses import ErrorResponse
from rest_bridge.routes.route_context import RouteContext

router = APIRouter()


# response_class=Response: the OpenAPI document then says what the server sends, an empty
# 200 with no content type, instead of FastAPI's default JSON.
@router.get("/health", response_class=Response, responses={
    200: {"description": "The engine is ready (empty body)."}, 503: {"model": ErrorResponse}})
async def health(request: Request) -> Response:
    """200 once the engine reports its Inference service SERVING (model loaded), else 503."""
    ctx = RouteContext.of(request)
    if await ctx.client.check_ready(timeout=ctx.settings.health_timeout):
        return Response(status_code=200)
    return JSONResponse(
        error_envelope("the engine is not ready", "service_unavailable_error"), status_code=503
    )


@router.get("/ping", response_class=Response,
            responses={200: {"description": "The bridge is up (empty body)."}})
async def ping() -> Response:
    """The bridge process is up, whatever the engine's state."""
    return Response(status_code=200)
