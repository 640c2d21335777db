"""Pydantic models of the OpenAI request and response bodies the bridge speaks."""
from __future__ import annotations

from rest_bridge.openai_schemas.chat import ChatCompletionRequest, ChatMessageParam
from rest_bridge.openai_schemas.completion import CompletionRequest
from rest_bridge.openai_schemas.responses import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    CompletionStreamResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)

__all__ = [
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatMessageParam",
    "CompletionRequest",
    "CompletionResponse",
    "CompletionStreamResponse",
    "ErrorResponse",
    "ModelCard",
    "ModelList",
]
