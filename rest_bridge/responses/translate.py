"""A Responses request -> the bridge's chat request, so /v1/responses runs the chat pipeline.

Nothing here templates, samples or parses tools: it only renames. `instructions` becomes the
first system message; input items become chat messages (`function_call` items an assistant
message's `tool_calls`, `function_call_output` items `tool` messages); flat function tools
become chat's nested ones; `text.format` becomes `response_format`; `max_output_tokens`
becomes `max_completion_tokens`. Errors name the Responses field, also when the chat pipeline
or the engine raised them about the chat field (`responses_param`).
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from rest_bridge.error_handlers import describe_validation_errors
from rest_bridge.errors import BridgeError, invalid_request
from rest_bridge.openai_schemas.chat import ChatCompletionRequest
from rest_bridge.responses.schemas import (
    ContentPart,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionTool,
    FunctionToolChoice,
    InputImagePart,
    InputItem,
    InputTextPart,
    MessageItem,
    ReasoningItem,
    ResponsesRequest,
)

ChatMessage = dict[str, Any]

_ITEM_MODELS: dict[str, type[BaseModel]] = {
    "message": MessageItem,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
    "reasoning": ReasoningItem,
}
# Request fields copied to the chat request under the same name when the client set them.
_SAME_NAME_FIELDS = (
    "model", "temperature", "top_p", "parallel_tool_calls", "user", "top_k", "min_p",
    "repetition_penalty", "seed", "priority", "cache_salt", "chat_template_kwargs",
    "guided_whitespace_pattern", "stream",
)
# Chat field (as the chat pipeline and the engine name it) -> the Responses field it came from.
_RESPONSES_PARAMS = {
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
    "guided_json": "text.format",
    "messages": "input",
    "stream_options": "stream",
}


def chat_request_of(
    body: ResponsesRequest, conversation: list[ChatMessage]
) -> ChatCompletionRequest:
    """The chat request equivalent to `body`, whose `conversation` is the stored one of
    `previous_response_id` followed by this turn's `input_messages` (instructions excluded:
    each turn's own instructions apply)."""
    messages: list[ChatMessage] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    messages += conversation
    chat: dict[str, Any] = {"messages": messages}
    for name in _SAME_NAME_FIELDS:
        value = getattr(body, name)
        if value is not None:
            chat[name] = value
    if body.max_output_tokens is not None:
        chat["max_completion_tokens"] = body.max_output_tokens
    if body.stream:
        # response.completed carries usage: the chat stream must end with it.
        chat["stream_options"] = {"include_usage": True}
    if body.tools:
        chat["tools"] = [chat_tool(raw, index) for index, raw in enumerate(body.tools)]
    if body.tool_choice is not None:
        chat["tool_choice"] = chat_tool_choice(body.tool_choice)
    response_format = chat_response_format(body)
    if response_format is not None:
        chat["response_format"] = response_format
    try:
        return ChatCompletionRequest.model_validate(chat)
    except ValidationError as error:
        # Everything above was validated already; this is a rule only chat states.
        first = error.errors()[0]
        param = ".".join(str(part) for part in first.get("loc", ()))
        raise invalid_request(f"{responses_param(param)}: {first.get('msg')}",
                              param=responses_param(param)) from None


def input_messages(body: ResponsesRequest) -> list[ChatMessage]:
    """This turn's input as chat messages."""
    if body.background:
        # Checked first: nothing else matters for a mode that is not served.
        raise invalid_request("background responses are not supported; send background=false",
                              param="background")
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}]
    return messages_of_items([parse_item(raw, index) for index, raw in enumerate(body.input)])


def parse_item(raw: dict[str, Any], index: int) -> InputItem:
    """One input item, validated as its `type` says (a message when it has none)."""
    kind = raw.get("type", "message")
    model = _ITEM_MODELS.get(kind) if isinstance(kind, str) else None
    if model is None:
        known = ", ".join(_ITEM_MODELS)
        raise invalid_request(f"input[{index}].type {kind!r} is not supported (one of {known})",
                              param=f"input[{index}].type")
    try:
        return model.model_validate(raw)  # type: ignore[return-value]
    except ValidationError as error:
        raise _named_error(error, f"input[{index}]") from None


def messages_of_items(items: list[InputItem]) -> list[ChatMessage]:
    """Chat messages of input items. Consecutive function calls are one assistant message's
    `tool_calls`, joined to the assistant message just before them, as chat carries them."""
    messages: list[ChatMessage] = []
    for item in items:
        if isinstance(item, MessageItem):
            messages.append(_message(item))
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output if isinstance(item.output, str) else "".join(
                part.text for part in item.output)
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
        # Reasoning items: earlier turns' reasoning is not part of the prompt.
    return messages


def _message(item: MessageItem) -> ChatMessage:
    # Chat templates know "system"; Responses' "developer" is its newer name.
    role = "system" if item.role == "developer" else item.role
    if isinstance(item.content, str):
        return {"role": role, "content": item.content}
    if all(isinstance(part, InputTextPart) for part in item.content):
        # Plain text, as a chat client would send it (some templates only take strings).
        return {"role": role, "content": "".join(_part_text(part) for part in item.content)}
    return {"role": role, "content": [_chat_part(part) for part in item.content]}


def _part_text(part: ContentPart) -> str:
    return part.text if isinstance(part, InputTextPart) else ""


def _chat_part(part: ContentPart) -> dict[str, Any]:
    if isinstance(part, InputTextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, InputImagePart):
        image: dict[str, Any] = {"url": part.image_url}
        if part.detail is not None:
            image["detail"] = part.detail
        return {"type": "image_url", "image_url": image}
    return {"type": "refusal", "refusal": part.refusal}


def chat_tool(raw: dict[str, Any], index: int) -> dict[str, Any]:
    """A flat Responses function tool -> chat's `{"type": "function", "function": {...}}`."""
    if raw.get("type") != "function":
        raise invalid_request(
            f"tools[{index}].type {raw.get('type')!r} is not supported; only function tools "
            "are served", param=f"tools[{index}].type")
    try:
        tool = FunctionTool.model_validate(raw)
    except ValidationError as error:
        raise _named_error(error, f"tools[{index}]") from None
    return {"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}


def chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        return choice
    try:
        named = FunctionToolChoice.model_validate(choice)
    except ValidationError as error:
        raise _named_error(error, "tool_choice") from None
    return {"type": "function", "function": {"name": named.name}}


def chat_response_format(body: ResponsesRequest) -> dict[str, Any] | None:
    """`text.format` as chat's `response_format` (None for plain text)."""
    if body.text is None or body.text.format is None or body.text.format.type == "text":
        return None
    fmt = body.text.format
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.json_schema is None:
        raise invalid_request("text.format.schema is required for a json_schema format",
                              param="text.format.schema")
    schema: dict[str, Any] = {"name": fmt.name or "response", "schema": fmt.json_schema}
    if fmt.description is not None:
        schema["description"] = fmt.description
    if fmt.strict is not None:
        schema["strict"] = fmt.strict
    return {"type": "json_schema", "json_schema": schema}


def responses_param(param: str | None) -> str | None:
    """The Responses field a chat field name came from (`max_completion_tokens` ->
    `max_output_tokens`, `messages[..]` -> `input`, `tools[i].function.x` -> `tools[i].x`)."""
    if not param:
        return param
    base = param.partition(".")[0].split("[", 1)[0]
    if base in _RESPONSES_PARAMS:
        return _RESPONSES_PARAMS[base]
    if base == "tools":
        return param.replace(".function.", ".", 1)
    return param


def with_responses_param(error: BridgeError) -> BridgeError:
    """`error`, its `param` renamed to the Responses field."""
    error.param = responses_param(error.param)
    return error


def _named_error(error: ValidationError, prefix: str) -> BridgeError:
    """A 400 naming the field under `prefix` (`input[2].content[0]`); a value that matches no
    member of a union is named by the field itself, as the body's own errors are."""
    message, common = describe_validation_errors(error.errors())
    param = prefix + "".join(f"[{part}]" if part.isdigit() else f".{part}"
                             for part in (common or "").split(".") if part)
    return invalid_request(f"{prefix}: {message}", param=param)
