"""Render chat messages into a prompt with a model's Jinja chat template.

Chat templates are untrusted code (they come with downloaded models, or in a request), so they
run in Jinja's immutable sandbox with the helpers and the hardening transformers gives them;
the rendered text matches `transformers`' `apply_chat_template(..., tokenize=False)`.
Every failure inside a template is the request's problem, never the engine's: it surfaces as
`InvalidRequestError` (a 400 / INVALID_ARGUMENT) carrying the template's own message.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import InvalidRequestError

# Appended to the final message when it is to be continued, then located in the rendered text
# to cut everything the template adds after the message (end-of-turn tokens and the like).
# The trailing space tells whether the template trimmed the content (transformers' technique).
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# Template variables that have their own request fields.
RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "tools", "documents", "add_generation_prompt"})


class TemplateRaisedError(jinja2.TemplateError):
    """A template called `raise_exception(message)`: it rejects the conversation."""


def render_chat_template(
    source: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool,
    tools: list[dict[str, Any]] | None,
    documents: list[dict[str, Any]] | None,
    variables: Mapping[str, Any],
) -> str:
    """The prompt text. `variables` are the special tokens and chat_template_kwargs."""
    if continue_final_message and add_generation_prompt:
        raise InvalidRequestError(
            "continue_final_message and add_generation_prompt cannot both be true: continue the "
            "final message, or start a new assistant message",
            field="continue_final_message",
        )
    conversation = template_messages(messages)
    final_content = _tag_final_message(conversation) if continue_final_message else None
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
        raise InvalidRequestError(f"chat template error: {_describe(error)}", field="messages")
    return rendered if final_content is None else _cut_after_final_message(rendered)


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plain-data copies of the messages in the shape templates expect.

    Keys whose value is None are dropped (OpenAI sends `content: null` next to tool calls, and
    templates test for a missing key); list-of-parts content becomes a string.
    """
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", field="messages")
    converted = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise InvalidRequestError(
                f"messages[{index}] must be an object with a string 'role'", field="messages"
            )
        plain = {key: _plain(value) for key, value in message.items() if value is not None}
        if isinstance(plain.get("content"), list):
            plain["content"] = content_parts_to_text(plain["content"], index)
        converted.append(plain)
    return converted


def content_parts_to_text(parts: list[Any], message_index: int) -> str:
    """Join `[{"type": "text", "text": ...}, ...]` into one string, parts separated by "\\n"."""
    texts = []
    for part in parts:
        if not isinstance(part, Mapping) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise InvalidRequestError(
                f"messages[{message_index}].content: part type {kind!r} is not supported "
                "(this model takes text parts only)",
                field="messages",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequestError(
                f"messages[{message_index}].content: a text part needs a string 'text'",
                field="messages",
            )
        texts.append(text)
    return "\n".join(texts)


@functools.lru_cache(maxsize=32)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile once per distinct template text. Raises jinja2.TemplateSyntaxError."""
    return _sandboxed_environment().from_string(source)


def _compile_or_reject(source: str) -> jinja2.Template:
    try:
        return compile_chat_template(source)
    except jinja2.TemplateError as error:
        raise InvalidRequestError(
            f"chat template does not compile: {_describe(error)}", field="chat_template"
        )


def _tag_final_message(conversation: list[dict[str, Any]]) -> str:
    final = conversation[-1]
    content = final.get("content")
    if not isinstance(content, str):
        raise InvalidRequestError(
            "continue_final_message needs a final message with text content",
            field="continue_final_message",
        )
    final["content"] = content + _CONTINUE_TAG
    return content


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
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return f"<{type(value).__name__}>"


def _raise_exception(message: str) -> None:
    raise TemplateRaisedError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes; chat templates expect plain JSON, as transformers gives.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format_string: str) -> str:
    return datetime.now().strftime(format_string)


class _TemplateDict:
    """`dict(...)` for templates without handing them the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A namespace that refuses underscore-prefixed attributes (no route to object internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's signature trick
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore-prefixed attribute {name!r} on a namespace"
            )


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (used by templates that mark assistant turns
    for training masks) renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """Jinja's sandbox renders a blocked attribute (`f.__globals__`) as an empty undefined
    value; here the attempt itself fails, so a probing template is rejected, never rendered."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )


def _sandboxed_environment() -> ImmutableSandboxedEnvironment:
    environment = _StrictSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlock],
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["dict"] = _TemplateDict()
    environment.globals["namespace"] = _TemplateNamespace
    return environment
