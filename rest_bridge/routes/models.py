"""`GET /v1/models` and `GET /v1/models/{model}`: the engine's Discovery/ListModels in the
OpenAI shapes."""
from __future__ import annotations

from typing import Any

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from protoserve.v1 import discovery_pb2
from rest_bridge.errors import BridgeError, bridge_error_from_rpc
from rest_bridge.openai_schemas.responses import ModelCard, ModelList
from rest_bridge.routes.route_context import ERROR_RESPONSES, RouteContext

router = APIRouter()

OWNED_BY = "protoserve"


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": await _all_cards(request)})


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def retrieve_model(model: str, request: Request) -> JSONResponse:
    """One card by served name; model names may contain slashes (hub ids, paths)."""
    for card in await _all_cards(request):
        if card["id"] == model:
            return JSONResponse(card)
    raise BridgeError(f"model {model!r} is not served here", http_status=404, param="model")


async def _all_cards(request: Request) -> list[dict[str, Any]]:
    ctx = RouteContext.of(request)
    try:
        models = await ctx.client.list_models(timeout=ctx.settings.request_timeout)
    except grpc.aio.AioRpcError as error:
        raise bridge_error_from_rpc(error) from None
    return [card for info in models for card in model_cards(info)]


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
            # A LoRA adapter's base model; null for base models.
            "parent": info.parent or None,
            "max_model_len": info.max_model_len or None,
            # The model's generation_config.json defaults, so a client can see why two
            # servers of the same model sample differently; null when none apply.
            "sampling_defaults": dict(info.sampling_defaults) or None,
        }
        for name in (info.id, *info.aliases)
    ]
