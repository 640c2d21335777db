"""Render chat messages into a prompt with a model's Jinja chat template.

Templates run in the sandbox of `template_sandbox`; the rendered text matches `transformers`'
`apply_chat_template(..., tokenize=False)`.
Every failure inside a template is the request's problem, never the engine's: it surfaces as
`InvalidRequestError` (a 400 / INVALID_ARGUMENT) carrying the template's own message.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import json

import jinja2

from engine.errors import InvalidRequestError
from engine.tokenizer.content_format import ContentFormat
from engine.tokenizer.template_sandbox import compile_chat_template

# Appended to the final message when it is to be continued, then located in the rendered text
# to cut everything the template adds after the message (end-of-turn tokens and the like).
# The trailing space tells whether the template trimmed the content (transformers' technique).
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# Template variables that have their own request fields.
RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "tools", "documents", "add_generation_prompt"})


def render_chat_template(
    source: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool,
    tools: list[dict[str, Any]] | None,
    documents: list[dict[str, Any]] | None,
    variables: Mapping[str, Any],
    content_format: ContentFormat = "string",
) -> str:
    """The prompt text. `variables` are the special tokens and chat_template_kwargs;
    `content_format` is the shape the template wants message content in."""
    if continue_final_message and add_generation_prompt:
        raise InvalidRequestError(
            "continue_final_message and add_generation_prompt cannot both be true: continue the "
            "final message, or start a new assistant message",
            field="continue_final_message",
        )
    conversation = template_messages(messages, content_format)
    if continue_final_message:
        _tag_final_message(conversation)
    template = _compile_or_reject(source)
    try:
        rendered = template.render(
            {
                **_plain(dict(variables)),
                "messages": conversation,
                "tools": _plain(tools),
                "documents": _plain(documents),
                "add_generation_prompt": add_generation_prompt,
            }
        )
    except Exception as error:  # noqa: BLE001 - any failure of template code is the request's
        raise InvalidRequestError(
            f"chat template error: {_describe(error)}", field="messages"
        ) from error
    return _cut_after_final_message(rendered) if continue_final_message else rendered


def template_messages(
    messages: list[dict[str, Any]], content_format: ContentFormat = "string"
) -> list[dict[str, Any]]:
    """Plain-data copies of the messages in the shape templates expect.

    Other keys whose value is None are dropped (templates test for a missing key); missing
    or null content (OpenAI sends `content: null` next to tool calls) becomes "" (or no
    parts), as the reference server renders it. Content becomes a string ("string" format: text parts
    joined by newlines) or a list of typed parts ("openai" format: a plain string becomes one
    text part). Tool-call arguments are decoded from JSON text to objects, as Hugging Face
    templates expect (they re-encode them with `tojson`).
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", field="messages")
    converted = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise InvalidRequestError(
                f"messages[{index}] must be an object with a string 'role'", field="messages"
            )
        plain = {key: _plain(value) for key, value in message.items() if value is not None}
        # A message without content (an assistant turn of tool calls) renders as empty
        # content, as the reference server does: ChatML-style templates read the key.
        content = plain.setdefault("content", "" if content_format == "string" else [])
        if content_format == "openai" and isinstance(content, str):
            plain["content"] = [{"type": "text", "text": content}]
        elif content_format == "openai" and isinstance(content, list):
            plain["content"] = content_parts_to_openai(content, index)
        elif isinstance(content, list):
            plain["content"] = content_parts_to_text(content, index)
        if isinstance(plain.get("tool_calls"), list):
            plain["tool_calls"] = [_decoded_tool_call(call) for call in plain["tool_calls"]]
        converted.append(plain)
    return converted


def content_parts_to_text(parts: list[Any], message_index: int) -> str:
    """Join `[{"type": "text", "text": ...}, ...]` into one string, parts separated by "\n"."""
    return "\n".join(part["text"] for part in content_parts_to_openai(parts, message_index))


def content_parts_to_openai(parts: list[Any], message_index: int) -> list[dict[str, Any]]:
    """Typed parts as OpenAI-format templates read them: `{"type": "text", "text": ...}`.
    A refusal is text the assistant said; media never get here for a text-only model (the
    input processor rejects them first), so any other part is an error."""
    converted = []
    for part in parts:
        kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
        if kind in ("text", "refusal"):
            text = part.get(kind)
            if not isinstance(text, str):
                raise InvalidRequestError(
                    f"messages[{message_index}].content: a {kind} part needs a string {kind!r}",
                    field="messages",
                )
            converted.append({"type": "text", "text": text})
            continue
        raise InvalidRequestError(
            f"messages[{message_index}].content: part type {kind!r} is not supported "
            "(this model takes text parts only)",
            field="messages",
        )
    return converted


def _decoded_tool_call(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        try:
            function["arguments"] = json.loads(function["arguments"])
        except ValueError:
            # Not JSON: the template gets the text as sent rather than a failed request.
            pass
    return call


def _compile_or_reject(source: str) -> jinja2.Template:
    try:
        return compile_chat_template(source)
    except jinja2.TemplateError as error:
        raise InvalidRequestError(
            f"chat template does not compile: {_describe(error)}", field="chat_template"
        ) from None


def _tag_final_message(conversation: list[dict[str, Any]]) -> None:
    final = conversation[-1]
    content = final.get("content")
    if isinstance(content, list) and content and content[-1].get("type") == "text":
        content[-1]["text"] += _CONTINUE_TAG
        return
    if not isinstance(content, str):
        raise InvalidRequestError(
            "continue_final_message needs a final message with text content",
            field="continue_final_message",
        )
    final["content"] = content + _CONTINUE_TAG


def _cut_after_final_message(rendered: str) -> str:
    marker = _CONTINUE_TAG.strip()
    location = rendered.rfind(marker)
    if location < 0:
        raise InvalidRequestError(
            "continue_final_message: the chat template does not render the final message's "
            "content, so it cannot be continued",
            field="continue_final_message",
        )
    if rendered.startswith(_CONTINUE_TAG, location):
        return rendered[:location]
    # The template trimmed the content's trailing whitespace along with the tag's space.
    return rendered[:location].rstrip()


def _describe(error: Exception) -> str:
    if isinstance(error, jinja2.TemplateSyntaxError):
        return f"{error.message} (line {error.lineno})"
    if isinstance(error, jinja2.TemplateError):
        return str(error.message or type(error).__name__)
    return f"{type(error).__name__}: {error}"


def _plain(value: Any) -> Any:
    """A deep copy made of JSON types only, so templates see no objects with methods."""
    if value is None or type(value) in (str, bool, int, float):
        return value
    # Subclasses (str enums and the like) carry extra methods: strip them to the base type.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return f"<{type(value).__name__}>"
