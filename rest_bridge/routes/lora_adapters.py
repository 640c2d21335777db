"""`POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`, the reference server's runtime
LoRA routes, over the engine's Admin/LoadLoraAdapter and Admin/UnloadLoraAdapter. The engine
decides whether runtime updating is allowed (--allow-runtime-lora-updating or
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; otherwise 400 saying so) and checks the adapter (400 naming the
file and field; 404 unloading a name not loaded). Success answers plain text, as there."""
from __future__ import annotations

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from protoserve.v1 import admin_pb2
from rest_bridge.errors import bridge_error_from_rpc
from rest_bridge.routes.route_context import ERROR_RESPONSES, RouteContext

router = APIRouter()


class LoadLoraAdapterBody(BaseModel):
    lora_name: str
    lora_path: str
    # Our extension (the JSON form of --lora-modules has it too): the served base model.
    base_model_name: str | None = None


class UnloadLoraAdapterBody(BaseModel):
    lora_name: str
    lora_path: str | None = None
    lora_int_id: int | None = None  # the reference server's field; the name alone decides


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=ERROR_RESPONSES)
async def load_lora_adapter(body: LoadLoraAdapterBody, request: Request) -> PlainTextResponse:
    ctx = RouteContext.of(request)
    try:
        await ctx.client.load_lora_adapter(
            admin_pb2.LoadLoraAdapterRequest(lora_name=body.lora_name, lora_path=body.lora_path,
                                             base_model_name=body.base_model_name or ""),
            timeout=ctx.settings.request_timeout)
    except grpc.aio.AioRpcError as error:
        raise bridge_error_from_rpc(error) from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse,
             responses=ERROR_RESPONSES)
async def unload_lora_adapter(body: UnloadLoraAdapterBody, request: Request) -> PlainTextResponse:
    ctx = RouteContext.of(request)
    try:
        await ctx.client.unload_lora_adapter(
            admin_pb2.UnloadLoraAdapterRequest(lora_name=body.lora_name,
                                               lora_path=body.lora_path or ""),
            timeout=ctx.settings.request_timeout)
    except grpc.aio.AioRpcError as error:
        raise bridge_error_from_rpc(error) from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
