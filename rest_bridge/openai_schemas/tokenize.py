"""`POST /tokenize` and `POST /detokenize` bodies (the vLLM extension routes)."""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field

from rest_bridge.openai_schemas.chat import ChatMessageParam, ToolParam
from rest_bridge.openai_schemas.engine_rules import CONTINUE_FINAL_MESSAGE_RULE
from rest_bridge.openai_schemas.request_fields import OpenAIModel, TokenId


class TokenizeCompletionRequest(OpenAIModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(OpenAIModel):
    model_config = ConfigDict(json_schema_extra=CONTINUE_FINAL_MESSAGE_RULE)

    model: str | None = None
    messages: Annotated[list[ChatMessageParam], Field(min_length=1)]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # The chat template normally writes the special tokens itself.
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ToolParam] | None = None
    return_token_strs: bool = False


# A body with `messages` is the chat form; anything else must be the completion form.
TokenizeRequest = Annotated[
    TokenizeChatRequest | TokenizeCompletionRequest, Field(union_mode="left_to_right")
]


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(OpenAIModel):
    prompt: str


class VersionResponse(OpenAIModel):
    version: str
