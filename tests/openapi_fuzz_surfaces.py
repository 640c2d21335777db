"""The fuzz hooks' edits for the bodies of /v1/responses and /v1/messages (+ count_tokens).

Both routes translate onto the chat pipeline, so the rules JSON Schema cannot state are the
chat ones under these APIs' names: embedded languages (a tool's JSON schema, an output
format's schema), a named tool choice that must be one of the tools, "auto" tool choice that
needs the server's tool parser, guided output with a forced tool call, the served model's
facts (no image input, the context length) and the server's state (a stored response id).
Each edit keeps the body schema-valid; the limits are openapi_fuzz_hooks.py's.
"""
from __future__ import annotations

from typing import Any

# Work per request and prompt size, as on the chat route (see openapi_fuzz_hooks.py).
MAX_NEW_TOKENS, MAX_TEXT_CHARS, MAX_MESSAGES = 4, 16, 4
INT64_MAX = 2**63 - 1
# A tool's parameters: any object (the tools' own schemas are JSON Schema text).
_ANY_OBJECT = {"type": "object"}


def within_responses_rules(body: dict[str, Any]) -> None:
    """A schema-valid /v1/responses body, edited in place to keep the unstated rules."""
    for name in ("chat_template_kwargs", "guided_whitespace_pattern"):
        body.pop(name, None)  # Jinja variables and a regex: other languages
    # Names a stored response: a random id is a 404 and tests nothing else.
    body.pop("previous_response_id", None)
    _cap(body, "max_output_tokens", MAX_NEW_TOKENS)
    _seed_in_int64(body)
    if isinstance(body.get("instructions"), str):
        body["instructions"] = body["instructions"][:MAX_TEXT_CHARS]
    if isinstance(body.get("input"), str):
        body["input"] = body["input"][:MAX_TEXT_CHARS]
    elif isinstance(body.get("input"), list):
        body["input"] = [_short_item(item) for item in _fewer_items(body["input"])]
    if isinstance(body.get("tools"), list):
        body["tools"] = [{"type": "function", "name": tool["name"][:MAX_TEXT_CHARS]}
                         for tool in body["tools"][:MAX_MESSAGES]
                         if isinstance(tool, dict) and isinstance(tool.get("name"), str)]
    text = body.get("text")
    output_format = text.get("format") if isinstance(text, dict) else None
    if isinstance(output_format, dict) and output_format.get("type") == "json_schema":
        output_format["schema"] = dict(_ANY_OBJECT)
    guided = isinstance(output_format, dict) and output_format.get("type") != "text"
    _tool_choice_the_server_takes(body, "required", guided)


def within_messages_rules(body: dict[str, Any]) -> None:
    """A schema-valid /v1/messages or count_tokens body, edited in place likewise."""
    _cap(body, "max_tokens", MAX_NEW_TOKENS)
    if isinstance(body.get("system"), str):
        body["system"] = body["system"][:MAX_TEXT_CHARS]
    elif isinstance(body.get("system"), list):
        body["system"] = [_short_block(block) for block in body["system"][:MAX_MESSAGES]]
    if isinstance(body.get("messages"), list):
        body["messages"] = body["messages"][:MAX_MESSAGES]
        for message in body["messages"]:
            if isinstance(message, dict):
                _short_message(message)
    if isinstance(body.get("tools"), list):
        body["tools"] = [{"name": tool["name"][:MAX_TEXT_CHARS], "input_schema": dict(_ANY_OBJECT)}
                         for tool in body["tools"][:MAX_MESSAGES]
                         if isinstance(tool, dict) and isinstance(tool.get("name"), str)]
    output_config = body.get("output_config")
    output_format = output_config.get("format") if isinstance(output_config, dict) else None
    if isinstance(output_format, dict):
        output_format["schema"] = dict(_ANY_OBJECT)
    choice = body.get("tool_choice")
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind in ("auto", "tool") or (kind == "any" and (output_format or not body.get("tools"))):
        body.pop("tool_choice")


def _tool_choice_the_server_takes(body: dict[str, Any], forced: str, guided: bool) -> None:
    """"auto" needs the server's tool parser, a named tool must be one of the tools, a forced
    call needs a tool and excludes guided output."""
    choice = body.get("tool_choice")
    if choice not in (None, "none", forced) or (choice == forced and (guided
                                                                      or not body.get("tools"))):
        body.pop("tool_choice", None)


def _fewer_items(items: list[Any]) -> list[Any]:
    """The first few items, with one that reaches the prompt if the body had one (reasoning
    items do not: the schema asks for another item when nothing else makes a conversation)."""
    kept = items[:MAX_MESSAGES]
    reaching = [item for item in items if not _is_reasoning(item)]
    if reaching and all(_is_reasoning(item) for item in kept):
        kept = [*kept[:MAX_MESSAGES - 1], reaching[0]]
    return kept


def _is_reasoning(item: Any) -> bool:
    return isinstance(item, dict) and item.get("type") == "reasoning"


def _short_item(item: Any) -> Any:
    """An input item within the context; images dropped (the served model reads text)."""
    if not isinstance(item, dict):
        return item
    content = item.get("content")
    if item.get("type", "message") == "message" and isinstance(content, list):
        item["content"] = [_short_part(part) for part in content[:MAX_MESSAGES]
                           if not (isinstance(part, dict) and part.get("type") == "input_image")]
    elif isinstance(content, str):
        item["content"] = content[:MAX_TEXT_CHARS]
    for name in ("arguments", "output"):
        if isinstance(item.get(name), str):
            item[name] = item[name][:MAX_TEXT_CHARS]
    if isinstance(item.get("output"), list):
        item["output"] = [_short_part(part) for part in item["output"][:MAX_MESSAGES]]
    return item


def _short_part(part: Any) -> Any:
    if isinstance(part, dict):
        for name in ("text", "refusal"):
            if isinstance(part.get(name), str):
                part[name] = part[name][:MAX_TEXT_CHARS]
    return part


def _short_message(message: dict[str, Any]) -> None:
    content = message.get("content")
    if isinstance(content, str):
        message["content"] = content[:MAX_TEXT_CHARS]
    elif isinstance(content, list):
        blocks = [_short_block(block) for block in content[:MAX_MESSAGES]
                  if not (isinstance(block, dict) and block.get("type") == "image")]
        message["content"] = blocks


def _short_block(block: Any) -> Any:
    """A content block within the context: its text cut, a tool result's images dropped."""
    if not isinstance(block, dict):
        return block
    for name in ("text", "thinking"):
        if isinstance(block.get(name), str):
            block[name] = block[name][:MAX_TEXT_CHARS]
    if block.get("type") == "tool_use":
        block["input"] = {}  # rendered into the prompt as JSON text
    inner = block.get("content")
    if isinstance(inner, str):
        block["content"] = inner[:MAX_TEXT_CHARS]
    elif isinstance(inner, list):
        block["content"] = [_short_block(part) for part in inner[:MAX_MESSAGES]
                            if not (isinstance(part, dict) and part.get("type") == "image")]
    return block


def _seed_in_int64(body: dict[str, Any]) -> None:
    # Numbers just past the int64 range compare equal to its ends in double precision.
    if _is_number(body.get("seed")):
        body["seed"] = max(min(body["seed"], INT64_MAX), -INT64_MAX - 1)


def _cap(body: dict[str, Any], name: str, cap: int) -> None:
    if _is_number(body.get(name)):
        body[name] = min(body[name], cap)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
