"""`GET /v1/models`: the engine's Discovery/ListModels in the OpenAI list shape."""
from __future__ import annotations

from typing import Any

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from protoserve.v1 import discovery_pb2
from rest_bridge.errors import bridge_error_from_rpc
from rest_bridge.openai_schemas.responses import ModelList
from rest_bridge.routes.common import ERROR_RESPONSES, RouteContext

router = APIRouter()

OWNED_BY = "protoserve"


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request) -> JSONResponse:
    ctx = RouteContext.of(request)
    try:
        models = await ctx.client.list_models(timeout=ctx.settings.request_timeout)
    except grpc.aio.AioRpcError as error:
        raise bridge_error_from_rpc(error) from None
    cards = [card for info in models for card in model_cards(info)]
    return JSONResponse({"object": "list", "data": cards})


def model_cards(info: discovery_pb2.ModelInfo) -> list[dict[str, Any]]:
    """One card per served name (the id, then each alias), as OpenAI clients look models up
    by the name they will send."""
    return [
        {
            "id": name,
            "object": "model",
            "created": info.created,
            "owned_by": OWNED_BY,
            "root": info.root or None,
            "parent": None,
            "max_model_len": info.max_model_len or None,
        }
        for name in (info.id, *info.aliases)
    ]
