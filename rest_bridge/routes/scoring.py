"""The reference server's scoring routes over the Score, Classify and Embed RPCs:

    /score, /v1/score              text pairs -> scores
    /rerank, /v1/rerank            query + documents -> ranked (Jina / Cohere v1 shape)
    /v2/rerank                     the same, in Cohere's v2 shape
    /classify                      inputs -> label probabilities
    /pooling                       inputs -> the raw pooled rows (Embed, not normalised)

A model that cannot answer (a generative model asked to score) is the engine's
INVALID_ARGUMENT naming `model`, a 400 here."""
from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from protoserve.v1 import discovery_pb2
from rest_bridge.errors import bridge_error_from_rpc
from rest_bridge.generation import cancel_on_disconnect
from rest_bridge.openai_schemas.scoring import (
    ClassifyRequest,
    ClassifyResponse,
    CohereRerankResponse,
    PoolingRequest,
    PoolingResponse,
    RerankRequest,
    RerankResponse,
    ScoreRequest,
    ScoreResponse,
)
from rest_bridge.routes.route_context import ERROR_RESPONSES, RouteContext, log_unknown_fields
from rest_bridge.translate import scoring as translate

router = APIRouter()
Reply = TypeVar("Reply")


async def _call(request: Request, ctx: RouteContext, aliases: dict[str, str],
                rpc: Callable[[], Awaitable[Reply]]) -> Reply:
    """One engine call, cancelled if the client goes away; engine errors in the envelope."""
    try:
        return await cancel_on_disconnect(request.receive, rpc)
    except grpc.aio.AioRpcError as error:
        raise bridge_error_from_rpc(error, field_aliases=aliases) from None


async def _model_name(ctx: RouteContext, requested: str | None) -> str:
    """The model the call went to: the named one, else the first pooling model (where an
    unnamed scoring call goes), else the first."""
    if requested:
        return requested
    try:
        models = await ctx.client.list_models(timeout=ctx.settings.request_timeout)
    except grpc.aio.AioRpcError:
        return ""
    for info in models:
        if info.task == discovery_pb2.MODEL_TASK_EMBED:
            return info.id
    return models[0].id if models else ""


async def _score(body: ScoreRequest | RerankRequest, request: Request, route: str,
                 aliases: dict[str, str]) -> tuple[Any, RouteContext, str]:
    ctx = RouteContext.of(request)
    log_unknown_fields(body, route, ctx.request_id)  # type: ignore[arg-type]
    message = (translate.score_request_from(body, ctx.request_id)
               if isinstance(body, ScoreRequest)
               else translate.rerank_request_from(body, ctx.request_id))
    reply = await _call(request, ctx, aliases, lambda: ctx.client.score(
        message, request_id=ctx.request_id, timeout=ctx.settings.request_timeout))
    return reply, ctx, await _model_name(ctx, body.model)


@router.post("/score", response_model=ScoreResponse, responses=ERROR_RESPONSES)
@router.post("/v1/score", response_model=ScoreResponse, responses=ERROR_RESPONSES)
async def create_score(body: ScoreRequest, request: Request) -> JSONResponse:
    reply, ctx, model = await _score(body, request, "/v1/score", translate.SCORE_ALIASES)
    return JSONResponse(translate.score_body(
        reply, response_id=f"score-{ctx.request_id}", created=int(time.time()), model=model))


@router.post("/rerank", response_model=RerankResponse, responses=ERROR_RESPONSES)
@router.post("/v1/rerank", response_model=RerankResponse, responses=ERROR_RESPONSES)
async def create_rerank(body: RerankRequest, request: Request) -> JSONResponse:
    reply, ctx, model = await _score(body, request, "/v1/rerank", translate.RERANK_ALIASES)
    return JSONResponse(translate.rerank_body(
        reply, body, response_id=f"rerank-{ctx.request_id}", model=model))


@router.post("/v2/rerank", response_model=CohereRerankResponse, responses=ERROR_RESPONSES)
async def create_rerank_v2(body: RerankRequest, request: Request) -> JSONResponse:
    reply, ctx, _ = await _score(body, request, "/v2/rerank", translate.RERANK_ALIASES)
    return JSONResponse(translate.cohere_v2_rerank_body(
        reply, body, response_id=f"rerank-{ctx.request_id}"))


@router.post("/classify", response_model=ClassifyResponse, responses=ERROR_RESPONSES)
async def create_classify(body: ClassifyRequest, request: Request) -> JSONResponse:
    ctx = RouteContext.of(request)
    log_unknown_fields(body, "/classify", ctx.request_id)  # type: ignore[arg-type]
    message = translate.classify_request_from(body, ctx.request_id)
    reply = await _call(request, ctx, translate.INPUT_ALIASES, lambda: ctx.client.classify(
        message, request_id=ctx.request_id, timeout=ctx.settings.request_timeout))
    return JSONResponse(translate.classify_body(
        reply, response_id=f"classify-{ctx.request_id}", created=int(time.time()),
        model=await _model_name(ctx, body.model)))


@router.post("/pooling", response_model=PoolingResponse, responses=ERROR_RESPONSES)
async def create_pooling(body: PoolingRequest, request: Request) -> JSONResponse:
    ctx = RouteContext.of(request)
    log_unknown_fields(body, "/pooling", ctx.request_id)  # type: ignore[arg-type]
    message = translate.pooling_request_from(body, ctx.request_id)
    reply = await _call(request, ctx, translate.INPUT_ALIASES, lambda: ctx.client.embed(
        message, request_id=ctx.request_id, timeout=ctx.settings.request_timeout))
    return JSONResponse(translate.pooling_body(
        reply, response_id=f"pool-{ctx.request_id}", created=int(time.time()),
        model=await _model_name(ctx, body.model), encoding_format=body.encoding_format))
