"""`POST /v1/chat/completions`: the engine renders the chat template; one Generate call.

`run_chat` is the one chat pipeline (tool plan, sampling translation, Generate call, OpenAI
body or chunks); other surfaces (/v1/responses) translate their requests onto it.
"""
from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from rest_bridge.generation import collect_results_watched, open_streams_watched
from rest_bridge.openai_schemas.chat import ChatCompletionRequest, ChatMessageParam
from rest_bridge.openai_schemas.responses import ChatCompletionResponse
from rest_bridge.routes.route_context import (
    ERROR_RESPONSES,
    RouteContext,
    log_unknown_fields,
    response_meta,
    stream_usage_flags,
    use_body_request_id,
)
from rest_bridge.sse import SSEResponse
from rest_bridge.streams import ChatChunkWriter, sse_stream
from rest_bridge.translate.proto_to_openai import ResponseMeta, chat_body
from rest_bridge.translate.request_to_proto import chat_to_plan
from rest_bridge.translate.tool_choice import tool_plan_from

router = APIRouter()

ASSISTANT_ROLE = "assistant"


@dataclass(frozen=True, slots=True)
class ChatRun:
    """One chat request started on the engine: `frames` (SSE bytes of chat.completion.chunk
    events, ending with [DONE]) when it streams, else the finished chat.completion `body`."""

    meta: ResponseMeta
    body: dict[str, Any] | None = None
    frames: AsyncGenerator[bytes, None] | None = None


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    use_body_request_id(request, body.request_id)
    log_unknown_fields(body, "/v1/chat/completions", RouteContext.of(request).request_id)
    run = await run_chat(body, request)
    if run.frames is not None:
        return SSEResponse(run.frames)
    return JSONResponse(run.body)


async def run_chat(body: ChatCompletionRequest, request: Request) -> ChatRun:
    """Run `body` as /v1/chat/completions does. Errors before the first byte (bad fields,
    engine refusals) raise BridgeError; later ones arrive as in-stream error events."""
    ctx = RouteContext.of(request)
    options = ctx.settings.chat
    tools = tool_plan_from(body, options)
    plan = chat_to_plan(body, ctx.request_id, options, tools)
    meta = await response_meta(ctx, "chatcmpl", body.model)
    role = response_role(body)
    echo_text = echo_text_of(body, role)
    want_logprobs = bool(body.logprobs)
    timeout = ctx.settings.request_timeout
    streams = await open_streams_watched(request.receive, ctx.client, plan, timeout=timeout)
    if body.stream:
        include_usage, continuous_usage = stream_usage_flags(body)
        writer = ChatChunkWriter(
            meta,
            streams,
            choices=plan.choices_per_prompt,
            role=role,
            echo_text=echo_text,
            want_logprobs=want_logprobs,
            include_usage=include_usage,
            continuous_usage=continuous_usage,
            tools=tools,
            prompt_tokens_details=options.enable_prompt_tokens_details,
        )
        return ChatRun(meta, frames=sse_stream(streams, writer, plan.field_aliases))
    results = await collect_results_watched(request.receive, streams, plan)
    content = chat_body(
        meta, results[0], role=role, echo_text=echo_text, want_logprobs=want_logprobs,
        tools=tools, prompt_tokens_details=options.enable_prompt_tokens_details,
    )
    return ChatRun(meta, body=content)


def response_role(body: ChatCompletionRequest) -> str:
    """The reply is the assistant's, unless no generation prompt was added: then the model
    continues the last message, in that message's role."""
    if body.add_generation_prompt or not body.messages:
        return ASSISTANT_ROLE
    return body.messages[-1].role


def echo_text_of(body: ChatCompletionRequest, role: str) -> str | None:
    """With `echo`, the last message's text is repeated before the reply when it has the
    reply's role (i.e. the model is continuing it)."""
    if not body.echo or not body.messages:
        return None
    last = body.messages[-1]
    if last.role != role:
        return None
    return message_text(last)


def message_text(message: ChatMessageParam) -> str:
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text or "" for part in message.content or () if part.type in (None, "text"))
