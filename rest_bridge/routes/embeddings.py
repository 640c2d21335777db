"""`POST /v1/embeddings`: one Embed call for the whole batch of inputs (answered in order)."""
from __future__ import annotations

import time

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from protoserve.v1 import discovery_pb2
from rest_bridge.errors import bridge_error_from_rpc
from rest_bridge.generation import cancel_on_disconnect
from rest_bridge.openai_schemas.embedding import EmbeddingRequest, EmbeddingResponse
from rest_bridge.routes.route_context import ERROR_RESPONSES, RouteContext, log_unknown_fields
from rest_bridge.translate.embedding import (
    CHAT_ALIASES,
    INPUT_ALIASES,
    embed_request_from,
    embedding_body,
)

router = APIRouter()


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES)
async def create_embedding(body: EmbeddingRequest, request: Request) -> JSONResponse:
    ctx = RouteContext.of(request)
    log_unknown_fields(body, "/v1/embeddings", ctx.request_id)
    message = embed_request_from(body, ctx.request_id)
    aliases = CHAT_ALIASES if body.messages is not None else INPUT_ALIASES
    timeout = ctx.settings.request_timeout
    try:
        reply = await cancel_on_disconnect(
            request.receive,
            lambda: ctx.client.embed(message, request_id=ctx.request_id, timeout=timeout),
        )
        model = body.model or await _default_embedding_model(ctx)
    except grpc.aio.AioRpcError as error:
        raise bridge_error_from_rpc(error, field_aliases=aliases) from None
    return JSONResponse(
        embedding_body(
            reply,
            response_id=f"embd-{ctx.request_id}",
            created=int(time.time()),
            model=model,
            encoding_format=body.encoding_format,
        )
    )


async def _default_embedding_model(ctx: RouteContext) -> str:
    """The model an unnamed Embed call went to: the first embedding model, else the first."""
    models = await ctx.client.list_models(timeout=ctx.settings.request_timeout)
    for info in models:
        if info.task == discovery_pb2.MODEL_TASK_EMBED:
            return info.id
    return models[0].id if models else ""
