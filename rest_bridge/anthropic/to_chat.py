"""Anthropic Messages request -> the bridge's ChatCompletionRequest.

Nothing here templates, samples or parses tools: the chat request that comes out runs the
same path as `/v1/chat/completions` (template in the engine, sampling translation, tool_choice
plan and parsers in the bridge). The mapping:

  system (string or text blocks) -> a leading "system" message (blocks joined as one text)
  user text / image blocks       -> a user message with text / image_url parts
  user tool_result blocks        -> one "tool" message each (tool_call_id = tool_use_id),
                                    before the user's other blocks: they answer the calls
                                    of the assistant turn just before
  assistant text / tool_use      -> an assistant message with content parts ("" when none)
                                    and tool_calls
  assistant thinking blocks      -> dropped (templates re-render no earlier reasoning)
  tools[].input_schema           -> tools[].function.parameters
  tool_choice auto/any/tool/none -> "auto" / "required" / the named function / "none"
  disable_parallel_tool_use      -> parallel_tool_calls = false
  stop_sequences, temperature, top_p, top_k, max_tokens -> the chat fields of the same meaning
  metadata.user_id               -> user
  thinking enabled/disabled      -> chat_template_kwargs.enable_thinking
  output_config.format           -> response_format json_schema (guided decoding)
  stream                         -> stream, with usage on every chunk (message_start needs
                                    input_tokens, message_delta the output count)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from rest_bridge.anthropic.schemas import (
    ImageBlock,
    MessageParam,
    MessagesRequest,
    PromptFields,
    TextBlock,
    ToolChoice,
    ToolChoiceAny,
    ToolChoiceAuto,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolResultBlock,
    ToolUseBlock,
)
from rest_bridge.error_handlers import describe_validation_errors
from rest_bridge.errors import invalid_request
from rest_bridge.openai_schemas.chat import ChatCompletionRequest

# OpenAI field names in chat errors -> the Anthropic field the client sent.
_FIELD_NAMES = {
    "stop": "stop_sequences",
    "max_completion_tokens": "max_tokens",
    "user": "metadata.user_id",
}


@dataclass(frozen=True, slots=True)
class ChatTranslation:
    """The chat request and, per chat message, the Anthropic path it came from, so an error
    about `messages.3...` of the chat request names the block the client wrote."""

    request: ChatCompletionRequest
    message_paths: tuple[str, ...]

    def client_field(self, param: str | None) -> str | None:
        """The Anthropic name of a chat request field path."""
        if param is None:
            return None
        head, _, rest = param.partition(".")
        if head == "messages":
            index, _, tail = rest.partition(".")
            if index.isdigit() and int(index) < len(self.message_paths):
                path = self.message_paths[int(index)]
                return f"{path}.{tail}" if tail else path
        return _FIELD_NAMES.get(param, param)


def chat_request_from(body: PromptFields) -> ChatTranslation:
    """The chat request for a Messages (or count_tokens) body."""
    messages: list[dict[str, Any]] = []
    paths: list[str] = []
    if body.system is not None:
        messages.append({"role": "system", "content": system_text(body.system)})
        paths.append("system")
    for index, message in enumerate(body.messages):
        for chat_message, path in _chat_messages(message, f"messages.{index}"):
            messages.append(chat_message)
            paths.append(path)
    fields: dict[str, Any] = {"messages": messages, "model": body.model}
    if body.tools:
        fields["tools"] = [
            {"type": "function", "function": {
                "name": tool.name, "parameters": tool.input_schema,
                **({"description": tool.description} if tool.description is not None else {}),
            }}
            for tool in body.tools
        ]
    if body.tool_choice is not None:
        fields.update(_tool_choice(body.tool_choice))
    if body.thinking is not None and body.thinking.type in ("enabled", "disabled"):
        fields["chat_template_kwargs"] = {"enable_thinking": body.thinking.type == "enabled"}
    output_format = body.output_config.format if body.output_config is not None else None
    if output_format is not None:
        fields["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "output", "schema": output_format.json_schema}}
    if isinstance(body, MessagesRequest):
        fields.update(_generation_fields(body))
    try:
        request = ChatCompletionRequest.model_validate(fields)
    except ValidationError as error:
        # Every field was validated on the Anthropic side already: this names what the chat
        # request still refuses.
        message, param = describe_validation_errors(error.errors())
        translation = ChatTranslation(ChatCompletionRequest.model_construct(), tuple(paths))
        raise invalid_request(message, param=translation.client_field(param)) from None
    return ChatTranslation(request, tuple(paths))


def system_text(system: str | list[TextBlock]) -> str:
    if isinstance(system, str):
        return system
    return "".join(block.text for block in system)


def _generation_fields(body: MessagesRequest) -> dict[str, Any]:
    fields: dict[str, Any] = {"max_tokens": body.max_tokens}
    for name in ("temperature", "top_p", "top_k"):
        value = getattr(body, name)
        if value is not None:
            fields[name] = value
    if body.stop_sequences:
        fields["stop"] = list(body.stop_sequences)
    if body.metadata is not None and body.metadata.user_id is not None:
        fields["user"] = body.metadata.user_id
    if body.stream:
        fields["stream"] = True
        fields["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    return fields


def _tool_choice(choice: ToolChoice) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if isinstance(choice, ToolChoiceAuto):
        fields["tool_choice"] = "auto"
    elif isinstance(choice, ToolChoiceAny):
        fields["tool_choice"] = "required"
    elif isinstance(choice, ToolChoiceTool):
        fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif isinstance(choice, ToolChoiceNone):
        fields["tool_choice"] = "none"
    if getattr(choice, "disable_parallel_tool_use", None):
        fields["parallel_tool_calls"] = False
    return fields


def _chat_messages(message: MessageParam, path: str) -> list[tuple[dict[str, Any], str]]:
    """One Anthropic message -> chat messages, each with the path it came from."""
    if isinstance(message.content, str):
        return [({"role": message.role, "content": message.content}, path)]
    if message.role == "assistant":
        return [(_assistant_message(message, path), path)]
    converted: list[tuple[dict[str, Any], str]] = []
    parts: list[dict[str, Any]] = []
    for index, block in enumerate(message.content):
        block_path = f"{path}.content.{index}"
        if isinstance(block, ToolResultBlock):
            converted.append((_tool_message(block, block_path), block_path))
        elif isinstance(block, TextBlock | ImageBlock):
            parts.append(_content_part(block, block_path))
        else:
            raise invalid_request(
                f"a user message cannot hold a {block.type!r} block", param=f"{block_path}.type")
    if parts or not converted:
        converted.append(({"role": "user", "content": parts}, path))
    return converted


def _assistant_message(message: MessageParam, path: str) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    tool_calls: list[dict[str, Any]] = []
    for index, block in enumerate(message.content):
        block_path = f"{path}.content.{index}"
        if isinstance(block, TextBlock | ImageBlock):
            parts.append(_content_part(block, block_path))
        elif isinstance(block, ToolUseBlock):
            tool_calls.append({"id": block.id, "type": "function", "function": {
                "name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}})
        elif isinstance(block, ToolResultBlock):
            raise invalid_request("an assistant message cannot hold a 'tool_result' block",
                                  param=f"{block_path}.type")
        # thinking / redacted_thinking: earlier reasoning is not sent back to the template.
    # "" rather than null for a turn of tool calls alone: templates read message.content.
    chat_message: dict[str, Any] = {"role": "assistant", "content": parts or ""}
    if tool_calls:
        chat_message["tool_calls"] = tool_calls
    return chat_message


def _tool_message(block: ToolResultBlock, path: str) -> dict[str, Any]:
    content: str | list[dict[str, Any]]
    if block.content is None:
        content = ""
    elif isinstance(block.content, str):
        content = block.content
    else:
        content = [_content_part(part, f"{path}.content.{index}")
                   for index, part in enumerate(block.content)]
    return {"role": "tool", "tool_call_id": block.tool_use_id, "content": content}


def _content_part(block: TextBlock | ImageBlock, path: str) -> dict[str, Any]:
    if isinstance(block, TextBlock):
        return {"type": "text", "text": block.text}
    source = block.source
    if source.type == "base64":
        if not source.data or not source.media_type:
            raise invalid_request("a base64 image source needs media_type and data",
                                  param=f"{path}.source")
        url = f"data:{source.media_type};base64,{source.data}"
    else:
        if not source.url:
            raise invalid_request("a url image source needs url", param=f"{path}.source.url")
        url = source.url
    return {"type": "image_url", "image_url": {"url": url}}
