"""`POST /v1/embeddings` request body: OpenAI's fields plus vLLM's extras, in one model.

The completion form sends `input`; the chat form sends `messages` instead (rendered through
the engine's chat template). Exactly one of the two is required; translation enforces that
so the error names the field.
"""
from __future__ import annotations

from typing import Any, Literal

from rest_bridge.openai_schemas.chat import ChatMessageParam
from rest_bridge.openai_schemas.common import Int32, OpenAIModel, TokenId


class EmbeddingRequest(OpenAIModel):
    model: str | None = None
    # A string, a batch of strings, one token-id list, or a batch of token-id lists.
    input: str | list[str] | list[TokenId] | list[list[TokenId]] | None = None
    messages: list[ChatMessageParam] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Int32 | None = None
    # Accepted and ignored (OpenAI's end-user id).
    user: str | None = None
    truncate_prompt_tokens: Int32 | None = None
    # Default: true for `input`, false for `messages` (the template writes its own).
    add_special_tokens: bool | None = None
    priority: Int32 | None = 0
    # vLLM extra: skip the L2 normalisation (default true).
    normalize: bool | None = None
    # Chat form only.
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class EmbeddingData(OpenAIModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str


class EmbeddingUsage(OpenAIModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(OpenAIModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage
