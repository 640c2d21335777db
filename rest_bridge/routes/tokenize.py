"""`POST /tokenize`, `POST /detokenize` and `GET /version`: the engine's Tokenizer and
Discovery services in the vLLM REST shapes. The engine owns the tokenizer and the chat
template, so these answer exactly what generation would use."""
from __future__ import annotations

from typing import Any

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from protoserve.v1 import common_pb2, tokenizer_pb2
from rest_bridge.errors import bridge_error_from_rpc
from rest_bridge.openai_schemas.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from rest_bridge.routes.route_context import ERROR_RESPONSES, RouteContext
from rest_bridge.translate.chat_input import chat_message_from

router = APIRouter()


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
    ctx = RouteContext.of(request)
    message = tokenizer_pb2.TokenizeRequest(
        model=body.model or "",
        add_special_tokens=body.add_special_tokens,
        return_token_strs=body.return_token_strs,
    )
    if isinstance(body, TokenizeChatRequest):
        message.chat.CopyFrom(_chat_input(body))
    else:
        message.text = body.prompt
    try:
        reply = await ctx.client.tokenize(message, timeout=ctx.settings.request_timeout)
    except grpc.aio.AioRpcError as error:
        raise bridge_error_from_rpc(error) from None
    content: dict[str, Any] = {
        "count": reply.count,
        "max_model_len": reply.max_model_len,
        "tokens": list(reply.token_ids),
    }
    if body.return_token_strs:
        content["token_strs"] = list(reply.token_strs)
    return JSONResponse(content)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
async def detokenize(body: DetokenizeRequest, request: Request) -> JSONResponse:
    ctx = RouteContext.of(request)
    try:
        text = await ctx.client.detokenize(
            body.model or "", list(body.tokens), timeout=ctx.settings.request_timeout
        )
    except grpc.aio.AioRpcError as error:
        raise bridge_error_from_rpc(error, field_aliases={"token_ids": "tokens"}) from None
    return JSONResponse({"prompt": text})


@router.get("/version", response_model=VersionResponse, responses=ERROR_RESPONSES)
async def version(request: Request) -> JSONResponse:
    ctx = RouteContext.of(request)
    try:
        value = await ctx.client.server_version(timeout=ctx.settings.health_timeout)
    except grpc.aio.AioRpcError as error:
        raise bridge_error_from_rpc(error) from None
    return JSONResponse({"version": value})


def _chat_input(body: TokenizeChatRequest) -> common_pb2.ChatInput:
    chat = common_pb2.ChatInput(
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
    )
    for index, message in enumerate(body.messages):
        chat.messages.append(chat_message_from(message, f"messages.{index}"))
    if body.chat_template is not None:
        chat.chat_template = body.chat_template
    if body.chat_template_kwargs:
        chat.chat_template_kwargs.update(body.chat_template_kwargs)
    for tool in body.tools or ():
        struct = chat.tools.add()
        struct.update(tool.model_dump(by_alias=True, exclude_none=True))
    return chat
