"""`POST /v1/completions`: one Generate call per prompt, run concurrently."""
from __future__ import annotations

from typing import Any

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from protoserve.v1 import inference_pb2
from rest_bridge.generation import (
    OpenStream,
    close_all,
    collect_results_watched,
    open_streams_watched,
    translate_engine_error,
)
from rest_bridge.openai_schemas.completion import CompletionRequest
from rest_bridge.openai_schemas.responses import CompletionResponse
from rest_bridge.routes.route_context import (
    ERROR_RESPONSES,
    RouteContext,
    log_unknown_fields,
    response_meta,
    stream_usage_flags,
)
from rest_bridge.sse import SSEResponse
from rest_bridge.streams import CompletionChunkWriter, sse_stream
from rest_bridge.translate.proto_to_openai import completion_body
from rest_bridge.translate.request_to_proto import GenerationPlan, completion_to_plan

router = APIRouter()


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    ctx = RouteContext.of(request)
    log_unknown_fields(body, "/v1/completions", ctx.request_id)
    plan = completion_to_plan(body, ctx.request_id,
                              ctx.settings.chat.return_tokens_as_token_ids)
    meta = await response_meta(ctx, "cmpl", body.model)
    timeout = ctx.settings.request_timeout
    streams = await open_streams_watched(request.receive, ctx.client, plan, timeout=timeout)
    try:
        echo_texts = await _echo_texts(ctx, plan, streams) if body.echo else None
    except BaseException as error:
        await close_all([stream.events for stream in streams])
        raise translate_engine_error(error, plan.field_aliases) from None
    want_logprobs = body.logprobs is not None
    prompt_tokens_details = ctx.settings.chat.enable_prompt_tokens_details
    if body.stream:
        include_usage, continuous_usage = stream_usage_flags(body)
        writer = CompletionChunkWriter(
            meta,
            streams,
            choices_per_prompt=plan.choices_per_prompt,
            echo_texts=echo_texts,
            want_logprobs=want_logprobs,
            include_usage=include_usage,
            continuous_usage=continuous_usage,
            prompt_tokens_details=prompt_tokens_details,
        )
        return SSEResponse(sse_stream(streams, writer, plan.field_aliases))
    results = await collect_results_watched(request.receive, streams, plan)
    content: dict[str, Any] = completion_body(
        meta,
        results,
        choices_per_prompt=plan.choices_per_prompt,
        echo_texts=echo_texts,
        want_logprobs=want_logprobs,
        prompt_tokens_details=prompt_tokens_details,
    )
    return JSONResponse(content)


async def _echo_texts(
    ctx: RouteContext, plan: GenerationPlan, streams: list[OpenStream]
) -> list[str]:
    """The prompt text of each call: as sent, as the engine rendered it, or detokenized."""
    texts: list[str] = []
    for request, stream in zip(plan.requests, streams, strict=True):
        texts.append(await _prompt_text(ctx, request, stream))
    return texts


async def _prompt_text(
    ctx: RouteContext, request: inference_pb2.GenerateRequest, stream: OpenStream
) -> str:
    if request.WhichOneof("input") == "text":
        return request.text
    if stream.started.prompt_text:
        return stream.started.prompt_text
    try:
        # The echoed prompt shows every token the client sent, special ones included (as the
        # reference server echoes a token-id prompt).
        return await ctx.client.detokenize(
            request.model, list(request.token_ids.ids), timeout=ctx.settings.request_timeout,
            skip_special_tokens=False,
        )
    except grpc.aio.AioRpcError as error:
        raise translate_engine_error(error, {}) from None
