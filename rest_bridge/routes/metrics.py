"""`GET /metrics`: Prometheus text. Request latencies as the bridge's clients see them, plus
the engine's queue and KV gauges (Discovery.GetLoad, asked at scrape time) and its model's
cache settings (Discovery.ListModels, asked once)."""
from __future__ import annotations

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import Response

from protoserve.serving_metrics import CONTENT_TYPE
from rest_bridge.routes.route_context import RouteContext

router = APIRouter()

# A scrape must answer even when the engine does not: its gauges are then left out.
_LOAD_TIMEOUT_S = 1.0


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    ctx = RouteContext.of(request)
    try:
        load = await ctx.client.get_load(timeout=_LOAD_TIMEOUT_S)
    except grpc.aio.AioRpcError:
        load = None
    bridge_metrics = request.app.state.metrics
    if load is not None and not bridge_metrics.model_name:
        # Once: the model_name label and cache_config_info (the engine's default model).
        try:
            models = await ctx.client.list_models(timeout=_LOAD_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            models = []
        if models:
            bridge_metrics.describe_model(models[0])
    return Response(bridge_metrics.render(load), media_type=CONTENT_TYPE)
