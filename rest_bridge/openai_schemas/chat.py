"""`POST /v1/chat/completions` request body."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from rest_bridge.openai_schemas.engine_rules import (
    CONTINUE_FINAL_MESSAGE_RULE,
    all_rules,
    engine_rule,
    must_be,
    present,
    when,
)
from rest_bridge.openai_schemas.request_fields import (
    SAMPLING_RULES,
    Count,
    OpenAIModel,
    PositiveCount,
    SamplingFields,
)

# Content part kinds, in the order translation infers a missing `type` from.
_PART_KINDS = ("text", "image_url", "audio_url", "input_audio", "refusal")
# A tool choice other than "none" picks from `tools`, so it needs some.
_CHOOSES_A_TOOL = {"required": ["tool_choice"], "properties": {"tool_choice": {
    "not": {"anyOf": [{"type": "null"}, {"const": "none"}]}}}}


# Media travel inline (data:) or by http(s) URL; the server fetches nothing else.
_MediaUrl = Annotated[str, engine_rule(pattern="^(data:|https?://)")]


class ImageUrlParam(OpenAIModel):
    url: _MediaUrl
    detail: str | None = None


class AudioUrlParam(OpenAIModel):
    url: _MediaUrl


class InputAudioParam(OpenAIModel):
    data: str
    format: str


class ContentPartParam(OpenAIModel):
    """One part of a multi-part content list.

    `type` may be omitted for a bare `{"image_url": ...}` part (a vLLM convenience); which
    member is present decides the kind when it is.
    """

    # A part needs the member its type names (translation refuses it otherwise).
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {**present(kind), "properties": {kind: {"not": {"type": "null"}},
                                         "type": {"enum": [kind, None]}}}
        for kind in _PART_KINDS]})

    type: str | None = None
    text: str | None = None
    image_url: _MediaUrl | ImageUrlParam | None = None
    audio_url: _MediaUrl | AudioUrlParam | None = None
    input_audio: InputAudioParam | None = None
    refusal: str | None = None


class ToolCallFunctionParam(OpenAIModel):
    name: str
    # JSON text per OpenAI; some clients send an object, which is serialised as given.
    arguments: str | dict[str, Any] = ""


class ToolCallParam(OpenAIModel):
    id: str = ""
    type: str = "function"
    function: ToolCallFunctionParam


class ChatMessageParam(OpenAIModel):
    """Any role the engine's chat template understands, not only the OpenAI four."""

    role: str
    content: str | list[ContentPartParam] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCallParam] | None = None


class FunctionDefinitionParam(OpenAIModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolParam(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionDefinitionParam


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    """OpenAI chat fields plus vLLM's extra sampling, template and decoding parameters."""

    model_config = ConfigDict(json_schema_extra=all_rules(
        *SAMPLING_RULES,
        when(present("top_logprobs"), must_be("logprobs", True)),
        CONTINUE_FINAL_MESSAGE_RULE,
        when(_CHOOSES_A_TOOL, {"required": ["tools"], "properties": {"tools": {
            "type": "array", "minItems": 1}}}),
    ))

    messages: Annotated[list[ChatMessageParam], Field(min_length=1)]
    logprobs: bool | None = False
    top_logprobs: Count | None = None
    # Deprecated by OpenAI in favour of max_completion_tokens; both are honoured.
    max_tokens: PositiveCount | None = None
    max_completion_tokens: PositiveCount | None = None
    tools: list[ToolParam] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    # Accepted and ignored: the engine emits tool calls as text in one sequence.
    parallel_tool_calls: bool | None = None
    echo: bool | None = False
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    add_special_tokens: bool | None = False
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # Names the request when no X-Request-Id header does (empty: the server picks one).
    request_id: Annotated[str, engine_rule(pattern="^[ -~]{0,256}$")] | None = None
