"""`POST /v1/chat/completions` request body."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from rest_bridge.openai_schemas.request_fields import Int32, OpenAIModel, SamplingFields


class ImageUrlParam(OpenAIModel):
    url: str
    detail: str | None = None


class AudioUrlParam(OpenAIModel):
    url: str


class InputAudioParam(OpenAIModel):
    data: str
    format: str


class ContentPartParam(OpenAIModel):
    """One part of a multi-part content list.

    `type` may be omitted for a bare `{"image_url": ...}` part (a vLLM convenience); which
    member is present decides the kind when it is.
    """

    type: str | None = None
    text: str | None = None
    image_url: str | ImageUrlParam | None = None
    audio_url: str | AudioUrlParam | None = None
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

    messages: Annotated[list[ChatMessageParam], Field(min_length=1)]
    logprobs: bool | None = False
    top_logprobs: Int32 | None = None
    # Deprecated by OpenAI in favour of max_completion_tokens; both are honoured.
    max_tokens: Int32 | None = None
    max_completion_tokens: Int32 | None = None
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
    # Names the request when no X-Request-Id header does.
    request_id: str | None = None
