"""`POST /v1/embeddings` request body: OpenAI's fields plus vLLM's extras, in one model.

The completion form sends `input`; the chat form sends `messages` instead (rendered through
the engine's chat template). Exactly one of the two is required; translation enforces that
so the error names the field.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from rest_bridge.openai_schemas.chat import ChatMessageParam
from rest_bridge.openai_schemas.engine_rules import CONTINUE_FINAL_MESSAGE_RULE, present
from rest_bridge.openai_schemas.request_fields import Int32, OpenAIModel, PositiveCount, TokenId

_Text = Annotated[str, Field(min_length=1)]
_TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class EmbeddingRequest(OpenAIModel):
    # /openapi.json says what translation enforces: exactly one of input / messages given
    # with a value (null counts as absent).
    model_config = ConfigDict(json_schema_extra={
        "oneOf": [present("input"), present("messages")],
        "allOf": [CONTINUE_FINAL_MESSAGE_RULE]})

    model: str | None = None
    # A string, a batch of strings, one token-id list, or a batch of token-id lists; none
    # of them empty.
    input: (_Text | Annotated[list[_Text], Field(min_length=1)] | _TokenIds
            | Annotated[list[_TokenIds], Field(min_length=1)] | None) = None
    messages: Annotated[list[ChatMessageParam], Field(min_length=1)] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    # At most the model's hidden size.
    dimensions: PositiveCount | None = None
    # Accepted and ignored (OpenAI's end-user id).
    user: str | None = None
    truncate_prompt_tokens: PositiveCount | None = None
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
