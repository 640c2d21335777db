"""`POST /v1/messages` and `POST /v1/messages/count_tokens`: the Anthropic Messages API.

Both translate the request onto the chat pipeline (`to_chat.chat_request_from`): messages run
`routes.chat.run_chat`, as /v1/chat/completions does, and its body or chunks are renamed into
Anthropic's shapes; count_tokens renders the same chat input through the engine's Tokenizer
service, so it counts exactly the prompt /v1/messages would run.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from protoserve.v1 import tokenizer_pb2
from rest_bridge.anthropic.errors import AnthropicErrorRoute
from rest_bridge.anthropic.from_chat import message_from_chat
from rest_bridge.anthropic.schemas import (
    CountTokensRequest,
    CountTokensResponse,
    ErrorResponse,
    MessageResponse,
    MessagesRequest,
    PromptFields,
)
from rest_bridge.anthropic.stream import message_events
from rest_bridge.anthropic.to_chat import ChatTranslation, chat_request_from
from rest_bridge.errors import BridgeError, bridge_error_from_rpc
from rest_bridge.openai_schemas.engine_rules import MESSAGES_UNSTATED_RULES
from rest_bridge.routes.chat import run_chat
from rest_bridge.routes.route_context import RouteContext
from rest_bridge.sse import SSEResponse
from rest_bridge.translate.chat_input import chat_input_from
from rest_bridge.translate.tool_choice import tool_plan_from

logger = logging.getLogger("rest_bridge.requests")

router = APIRouter(route_class=AnthropicErrorRoute)

# Every error these routes answer has Anthropic's error shape.
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 499, 500, 501, 503, 504)
}
_ERROR_RESPONSES[400]["description"] = (
    f"Invalid request (the message names the field). {MESSAGES_UNSTATED_RULES}")
MESSAGES_ROUTE = "/v1/messages"
COUNT_TOKENS_ROUTE = "/v1/messages/count_tokens"


@router.post(
    MESSAGES_ROUTE,
    response_model=MessageResponse,
    responses={**_ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
)
async def create_message(body: MessagesRequest, request: Request) -> Response:
    ctx = RouteContext.of(request)
    _log_unknown_fields(body, MESSAGES_ROUTE, ctx.request_id)
    translation = chat_request_from(body)
    with _client_field_names(translation):
        run = await run_chat(translation.request, request)
    if run.frames is not None:
        return SSEResponse(message_events(run.frames, ctx.request_id))
    assert run.body is not None
    return JSONResponse(message_from_chat(run.body, ctx.request_id))


@router.post(COUNT_TOKENS_ROUTE, response_model=CountTokensResponse, responses=_ERROR_RESPONSES)
async def count_message_tokens(body: CountTokensRequest, request: Request) -> JSONResponse:
    ctx = RouteContext.of(request)
    _log_unknown_fields(body, COUNT_TOKENS_ROUTE, ctx.request_id)
    translation = chat_request_from(body)
    chat = translation.request
    with _client_field_names(translation):
        # The tool plan decides whether the template sees the tools (not with "none").
        tools = tool_plan_from(chat, ctx.settings.chat)
        message = tokenizer_pb2.TokenizeRequest(model=chat.model or "")
        message.chat.CopyFrom(
            chat_input_from(chat, ctx.settings.chat, send_tools=tools.send_tools))
        try:
            reply = await ctx.client.tokenize(message, timeout=ctx.settings.request_timeout)
        except grpc.aio.AioRpcError as error:
            raise bridge_error_from_rpc(error) from None
    return JSONResponse({"input_tokens": reply.count})


@contextmanager
def _client_field_names(translation: ChatTranslation) -> Iterator[None]:
    """Errors of the chat pipeline name chat fields; rename them to the client's."""
    try:
        yield
    except BridgeError as error:
        error.param = translation.client_field(error.param)
        raise


def _log_unknown_fields(body: PromptFields, route: str, request_id: str) -> None:
    """Unknown fields are accepted so newer Anthropic fields never break clients; say so."""
    if body.model_extra:
        logger.warning("request %s to %s: ignoring unknown fields %s", request_id, route,
                       ", ".join(sorted(body.model_extra)))
