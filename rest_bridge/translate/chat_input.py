"""OpenAI chat messages and template options -> ChatInput (the engine renders the template)."""
from __future__ import annotations

import json
from typing import Any

from google.protobuf import struct_pb2

from protoserve.v1 import common_pb2
from rest_bridge.chat_options import ChatOptions
from rest_bridge.errors import invalid_request
from rest_bridge.openai_schemas.chat import (
    ChatCompletionRequest,
    ChatMessageParam,
    ContentPartParam,
    ImageUrlParam,
    NamedToolChoice,
    ToolCallParam,
)
from rest_bridge.translate.media import check_input_audio, check_media_url

_DEFAULT_OPTIONS = ChatOptions()


def chat_input_from(
    body: ChatCompletionRequest,
    options: ChatOptions = _DEFAULT_OPTIONS,
    *,
    send_tools: bool = True,
) -> common_pb2.ChatInput:
    """`send_tools` False keeps the tools from the template (tool_choice "none")."""
    chat = common_pb2.ChatInput()
    for index, message in enumerate(body.messages):
        chat.messages.append(chat_message_from(message, f"messages.{index}", options))
    if body.is_set("add_generation_prompt"):
        chat.add_generation_prompt = bool(body.add_generation_prompt)
    if body.is_set("continue_final_message"):
        chat.continue_final_message = bool(body.continue_final_message)
    if body.is_set("chat_template"):
        chat.chat_template = body.chat_template or ""
    if body.chat_template_kwargs:
        chat.chat_template_kwargs.update(body.chat_template_kwargs)
    for tool in body.tools if send_tools and body.tools else ():
        chat.tools.append(_struct(tool.model_dump(by_alias=True, exclude_none=True)))
    for document in body.documents or ():
        chat.documents.append(_struct(document))
    if body.tool_choice is not None:
        chat.tool_choice = _tool_choice_name(body.tool_choice)
    return chat


def chat_message_from(
    message: ChatMessageParam, path: str, options: ChatOptions = _DEFAULT_OPTIONS
) -> common_pb2.ChatMessage:
    converted = common_pb2.ChatMessage(role=message.role)
    content = message.content
    if isinstance(content, str):
        converted.text = content
    elif content is not None:
        parts = converted.parts.parts
        for index, part in enumerate(content):
            parts.append(content_part_from(part, f"{path}.content.{index}", options))
        # An empty list still means "has content", distinct from an absent content.
        converted.parts.SetInParent()
    if message.name is not None:
        converted.name = message.name
    if message.tool_call_id is not None:
        converted.tool_call_id = message.tool_call_id
    for tool_call in message.tool_calls or ():
        converted.tool_calls.append(_tool_call_from(tool_call))
    return converted


def content_part_from(
    part: ContentPartParam, path: str, options: ChatOptions = _DEFAULT_OPTIONS
) -> common_pb2.ContentPart:
    """Decide the part kind from `type`, or from the one member present when `type` is absent.
    Media are checked against the server's limits here, before the engine sees them."""
    kind = part.type or _inferred_kind(part)
    if kind == "text" and part.text is not None:
        return common_pb2.ContentPart(text=part.text)
    if kind == "image_url" and part.image_url is not None:
        image = _image_url(part.image_url)
        check_media_url(image.url, "image", options, f"{path}.image_url")
        return common_pb2.ContentPart(image_url=image)
    if kind == "audio_url" and part.audio_url is not None:
        url = part.audio_url if isinstance(part.audio_url, str) else part.audio_url.url
        check_media_url(url, "audio", options, f"{path}.audio_url")
        return common_pb2.ContentPart(audio_url=common_pb2.AudioUrl(url=url))
    if kind == "input_audio" and part.input_audio is not None:
        audio = part.input_audio
        check_input_audio(audio.data, audio.format, options, f"{path}.input_audio")
        return common_pb2.ContentPart(
            input_audio=common_pb2.InputAudio(data=audio.data, format=audio.format)
        )
    if kind == "refusal" and part.refusal is not None:
        return common_pb2.ContentPart(refusal=part.refusal)
    if kind in ("text", "image_url", "audio_url", "input_audio", "refusal"):
        raise invalid_request(
            f"content part of type {kind!r} lacks its {kind!r} member", param=path
        )
    raise invalid_request(f"unsupported content part type {kind!r}", param=f"{path}.type")


def _inferred_kind(part: ContentPartParam) -> str | None:
    for kind in ("text", "image_url", "audio_url", "input_audio", "refusal"):
        if getattr(part, kind) is not None:
            return kind
    return None


def _image_url(value: str | ImageUrlParam) -> common_pb2.ImageUrl:
    if isinstance(value, str):
        return common_pb2.ImageUrl(url=value)
    image = common_pb2.ImageUrl(url=value.url)
    if value.detail is not None:
        image.detail = value.detail
    return image


def _tool_call_from(tool_call: ToolCallParam) -> common_pb2.ToolCall:
    arguments = tool_call.function.arguments
    return common_pb2.ToolCall(
        id=tool_call.id,
        type=tool_call.type,
        function=common_pb2.ToolCallFunction(
            name=tool_call.function.name,
            arguments=arguments if isinstance(arguments, str) else json.dumps(arguments),
        ),
    )


def _tool_choice_name(choice: str | NamedToolChoice) -> str:
    # The proto carries "none" | "auto" | "required" | a function name.
    return choice if isinstance(choice, str) else choice.function.name


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct

