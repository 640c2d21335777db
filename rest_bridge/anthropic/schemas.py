"""Anthropic Messages API bodies: the request models (validated, strict JSON types) and the
response shapes the routes build as plain dicts (documented here for /openapi.json and tests).

Unknown request fields are kept and reported, as on the OpenAI routes, so a newer client field
never breaks a request. Content blocks are told apart by `type`; a block type the bridge
cannot serve (documents, server tools' results) is a 400 naming the block.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rest_bridge.openai_schemas.engine_rules import (
    TEMPERATURE_RANGE,
    TOP_K_RANGE,
    TOP_P_RANGE,
    all_rules,
    left_to_model_defaults,
    must_be,
    when,
)
from rest_bridge.openai_schemas.request_fields import Int32, PositiveCount, StopString


class AnthropicModel(BaseModel):
    """Strict types (a wrong JSON type is a 400, never coerced), unknown fields accepted."""

    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)


class TextBlock(AnthropicModel):
    type: Literal["text"]
    text: str
    # Prompt caching hints and citations are accepted; the prefix cache needs no hint.
    cache_control: dict[str, Any] | None = None
    citations: list[dict[str, Any]] | None = None


def _non_empty(*fields: str, **keywords: Any) -> dict[str, Any]:
    """JSON Schema for "each of `fields` is a non-empty string" (plus `keywords` on each)."""
    return {"required": list(fields), "properties": {
        name: {"type": "string", "minLength": 1, **keywords} for name in fields}}


class ImageSource(AnthropicModel):
    # Translation refuses a source without what its type needs (naming `.source`); a URL is
    # a data: or http(s) URL, as the chat route's image_url.
    model_config = ConfigDict(json_schema_extra=all_rules(
        when(must_be("type", "base64"), _non_empty("media_type", "data")),
        when(must_be("type", "url"), _non_empty("url", pattern="^(data:|https?://)"))))

    type: Literal["base64", "url"]
    media_type: str | None = None
    data: str | None = None
    url: str | None = None


class ImageBlock(AnthropicModel):
    type: Literal["image"]
    source: ImageSource
    cache_control: dict[str, Any] | None = None


class ToolUseBlock(AnthropicModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


ToolResultContent = Annotated[TextBlock | ImageBlock, Field(discriminator="type")]


class ToolResultBlock(AnthropicModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[ToolResultContent] | None = None
    is_error: bool | None = None
    cache_control: dict[str, Any] | None = None


class ThinkingBlock(AnthropicModel):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(AnthropicModel):
    type: Literal["redacted_thinking"]
    data: str


ContentBlock = Annotated[
    TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock
    | RedactedThinkingBlock,
    Field(discriminator="type"),
]


def _no_blocks(*block_types: str) -> dict[str, Any]:
    """JSON Schema for "a content list holds none of `block_types`" (a string passes)."""
    return {"properties": {"content": {"items": {"properties": {
        "type": {"not": {"enum": list(block_types)}}}}}}}


class MessageParam(AnthropicModel):
    # Only the assistant calls tools and thinks; only the user answers tool calls.
    model_config = ConfigDict(json_schema_extra=all_rules(
        when(must_be("role", "user"), _no_blocks("tool_use", "thinking", "redacted_thinking")),
        when(must_be("role", "assistant"), _no_blocks("tool_result"))))

    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class ToolDefinition(AnthropicModel):
    name: Annotated[str, Field(min_length=1)]
    description: str | None = None
    input_schema: dict[str, Any]
    # "custom" (or absent) is a client tool; Anthropic's server tools have no input_schema.
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None


class ToolChoiceAuto(AnthropicModel):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(AnthropicModel):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(AnthropicModel):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(AnthropicModel):
    type: Literal["none"]


ToolChoice = Annotated[
    ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone,
    Field(discriminator="type"),
]


class ThinkingConfig(AnthropicModel):
    # "enabled"/"disabled" reach the chat template as enable_thinking; other kinds
    # ("adaptive", ...) leave the template's default. The budget is not a separate limit here
    # (max_tokens bounds thinking and answer together).
    type: str
    budget_tokens: Int32 | None = None


class JsonOutputFormat(AnthropicModel):
    type: Literal["json_schema"]
    # `schema` clashes with a BaseModel attribute, hence the alias.
    json_schema: dict[str, Any] = Field(alias="schema")


class OutputConfig(AnthropicModel):
    # Accepted and ignored: the served model has no effort levels.
    effort: str | None = None
    format: JsonOutputFormat | None = None


class Metadata(AnthropicModel):
    user_id: str | None = None


class PromptFields(AnthropicModel):
    """What decides the prompt: shared by /v1/messages and /v1/messages/count_tokens."""

    model: str
    messages: Annotated[list[MessageParam], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    # Structured output: held to the schema by the engine's guided decoding.
    output_config: OutputConfig | None = None


class MessagesRequest(PromptFields):
    # Required by Anthropic's API (unlike OpenAI's): there is no server default to fall back on.
    max_tokens: PositiveCount
    stop_sequences: list[StopString] | None = None
    stream: bool | None = False
    temperature: Annotated[float, TEMPERATURE_RANGE] | None = left_to_model_defaults(1.0)
    top_p: Annotated[float, TOP_P_RANGE] | None = left_to_model_defaults(1.0)
    top_k: Annotated[Int32, TOP_K_RANGE] | None = None
    metadata: Metadata | None = None
    service_tier: str | None = None


class CountTokensRequest(PromptFields):
    pass


# Response shapes (built as dicts by the routes).


class ResponseShape(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Usage(ResponseShape):
    input_tokens: int
    output_tokens: int


class MessageResponse(ResponseShape):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[dict[str, Any]]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None
    usage: Usage


class CountTokensResponse(ResponseShape):
    input_tokens: int


class ErrorDetail(ResponseShape):
    type: str
    message: str


class ErrorResponse(ResponseShape):
    type: Literal["error"]
    error: ErrorDetail
