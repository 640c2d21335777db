"""`POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`, the reference server's runtime
LoRA routes, over the engine's Admin/LoadLoraAdapter and Admin/UnloadLoraAdapter. The engine
decides whether runtime updating is allowed (--allow-runtime-lora-updating or
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; otherwise 404 saying which flag, as the reference has no
such routes then) and checks the adapter (400 naming the file and field; 404 unloading a name
not loaded). Success answers plain text, as there. Where the engine has an admin key, these
routes take it (rest_bridge/middleware.py) and pass it on to Admin."""
from __future__ import annotations

from typing import Any

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from protoserve.v1 import admin_pb2
from rest_bridge.errors import BridgeError, bridge_error_from_rpc
from rest_bridge.middleware import ADMIN_KEY_STATE
from rest_bridge.routes.route_context import ERROR_RESPONSES, RouteContext

router = APIRouter()

# Success is plain text; errors keep the JSON envelope of every route.
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **ERROR_RESPONSES}


class LoadLoraAdapterBody(BaseModel):
    lora_name: str
    lora_path: str
    # Our extension (the JSON form of --lora-modules has it too): the served base model.
    base_model_name: str | None = None


class UnloadLoraAdapterBody(BaseModel):
    lora_name: str
    lora_path: str | None = None
    lora_int_id: int | None = None  # the reference server's field; the name alone decides


@router.post("/v1/load_lora_adapter", responses=_RESPONSES)
async def load_lora_adapter(body: LoadLoraAdapterBody, request: Request) -> PlainTextResponse:
    ctx = RouteContext.of(request)
    try:
        await ctx.client.load_lora_adapter(
            admin_pb2.LoadLoraAdapterRequest(lora_name=body.lora_name, lora_path=body.lora_path,
                                             base_model_name=body.base_model_name or ""),
            timeout=ctx.settings.request_timeout, admin_key=_admin_key(request))
    except grpc.aio.AioRpcError as error:
        raise _route_error(error) from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", responses=_RESPONSES)
async def unload_lora_adapter(body: UnloadLoraAdapterBody, request: Request) -> PlainTextResponse:
    ctx = RouteContext.of(request)
    try:
        await ctx.client.unload_lora_adapter(
            admin_pb2.UnloadLoraAdapterRequest(lora_name=body.lora_name,
                                               lora_path=body.lora_path or ""),
            timeout=ctx.settings.request_timeout, admin_key=_admin_key(request))
    except grpc.aio.AioRpcError as error:
        raise _route_error(error) from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def _admin_key(request: Request) -> str | None:
    key = getattr(request.state, ADMIN_KEY_STATE, None)
    return key if isinstance(key, str) else None


def _route_error(error: grpc.aio.AioRpcError) -> BridgeError:
    if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
        # LoRA or runtime updating is off: the reference server has no such routes then.
        return BridgeError(error.details() or "not found", http_status=404,
                           error_type="not_found_error")
    return bridge_error_from_rpc(error)
