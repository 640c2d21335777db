"""`POST /v1/chat/completions/render` and `POST /v1/completions/render`: the token-in request
the engine would run for a chat or completion body, without generating (the reference
server's render routes). The body goes through the same translation as the generating route
(chat_to_plan / completion_to_plan), then the engine's Inference/Render reads each planned
Generate call exactly as Generate would: chat template, tokenization, truncation, the model's
sampling defaults, every check. So the answer, and any 4xx, is the real route's."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from protoserve.v1 import inference_pb2
from rest_bridge.generation import translate_engine_error
from rest_bridge.openai_schemas.render import (
    ChatRenderRequest,
    CompletionRenderRequest,
    RenderedGenerateRequest,
)
from rest_bridge.routes.route_context import (
    ERROR_RESPONSES,
    RouteContext,
    log_unknown_fields,
    use_body_request_id,
)
from rest_bridge.translate.render import generate_request_json
from rest_bridge.translate.request_to_proto import (
    GenerationPlan,
    chat_to_plan,
    completion_to_plan,
)
from rest_bridge.translate.tool_choice import tool_plan_from

router = APIRouter()

CHAT_RENDER_PATH = "/v1/chat/completions/render"
COMPLETION_RENDER_PATH = "/v1/completions/render"


@router.post(CHAT_RENDER_PATH, response_model=RenderedGenerateRequest,
             responses=ERROR_RESPONSES)
async def render_chat_completion(body: ChatRenderRequest, request: Request) -> JSONResponse:
    use_body_request_id(request, body.request_id)
    ctx = RouteContext.of(request)
    log_unknown_fields(body, CHAT_RENDER_PATH, ctx.request_id)
    options = ctx.settings.chat
    plan = chat_to_plan(body, ctx.request_id, options, tool_plan_from(body, options))
    (rendered,) = await _render_plan(ctx, plan)
    return JSONResponse(generate_request_json(body, rendered, "chatcmpl"))


@router.post(COMPLETION_RENDER_PATH, response_model=list[RenderedGenerateRequest],
             responses=ERROR_RESPONSES)
async def render_completion(body: CompletionRenderRequest, request: Request) -> JSONResponse:
    ctx = RouteContext.of(request)
    log_unknown_fields(body, COMPLETION_RENDER_PATH, ctx.request_id)
    plan = completion_to_plan(body, ctx.request_id, ctx.settings.chat.return_tokens_as_token_ids)
    rendered = await _render_plan(ctx, plan)
    return JSONResponse([generate_request_json(body, one, "cmpl") for one in rendered])


async def _render_plan(
    ctx: RouteContext, plan: GenerationPlan
) -> list[inference_pb2.RenderResponse]:
    """One Render call per planned Generate call, concurrently; the first engine error is
    answered with the OpenAI field names the client sent."""
    timeout = ctx.settings.request_timeout
    calls = [ctx.client.render(generate, timeout=timeout) for generate in plan.requests]
    results = await asyncio.gather(*calls, return_exceptions=True)
    rendered: list[inference_pb2.RenderResponse] = []
    for result in results:
        if isinstance(result, BaseException):
            raise translate_engine_error(result, plan.field_aliases) from None
        rendered.append(result)
    return rendered
