"""A `chat.completion` body -> an Anthropic `message`, and the pieces the stream shares:
stop reasons, usage, content blocks.

The chat pipeline has already parsed tool calls and reasoning; this only renames:

  message.reasoning_content (or .reasoning) -> a "thinking" block, first
  message.content                          -> a "text" block (none when empty)
  message.tool_calls                       -> "tool_use" blocks (arguments parsed as input)
  finish_reason / stop_reason              -> stop_reason / stop_sequence:
      tool calls present (stop)  -> "tool_use"
      "length"                   -> "max_tokens"
      "stop" by a stop string    -> "stop_sequence" (the string in stop_sequence)
      "stop" otherwise (EOS)     -> "end_turn"
  usage.prompt_tokens / completion_tokens -> usage.input_tokens / output_tokens
"""
from __future__ import annotations

import json
import logging
from typing import Any

logger = logging.getLogger(__name__)

MESSAGE_ID_PREFIX = "msg_"


def message_id(request_id: str) -> str:
    return MESSAGE_ID_PREFIX + request_id


def reasoning_of(message: dict[str, Any]) -> str:
    """The reasoning text of a chat message or delta, under either of its field names."""
    return message.get("reasoning_content") or message.get("reasoning") or ""


def stop_reason_of(
    finish_reason: str | None, matched_stop: int | str | None, *, tool_calls: bool
) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) for a chat choice's finish_reason and vLLM stop_reason."""
    if finish_reason == "length":
        return "max_tokens", None
    if tool_calls or finish_reason == "tool_calls":
        return "tool_use", None
    if finish_reason == "stop" and isinstance(matched_stop, str):
        return "stop_sequence", matched_stop
    # EOS or a stop token id; an aborted choice has no closer Anthropic name.
    return "end_turn", None


def usage_of(usage: dict[str, Any] | None) -> dict[str, int]:
    usage = usage or {}
    return {"input_tokens": int(usage.get("prompt_tokens", 0)),
            "output_tokens": int(usage.get("completion_tokens", 0))}


def thinking_block(text: str) -> dict[str, Any]:
    # No signature: nothing here signs reasoning, and clients only pass it back.
    return {"type": "thinking", "thinking": text, "signature": ""}


def tool_use_block(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    return {"type": "tool_use", "id": call.get("id") or "", "name": function.get("name") or "",
            "input": tool_input(function.get("arguments") or "")}


def tool_input(arguments: str) -> dict[str, Any]:
    """The call's arguments as Anthropic's `input` object. Arguments cut short by max_tokens
    are not JSON: the block then carries an empty input (stop_reason says max_tokens)."""
    if not arguments:
        return {}
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        logger.debug("tool call arguments are not complete JSON: %r", arguments)
        return {}
    return value if isinstance(value, dict) else {}


def message_from_chat(body: dict[str, Any], request_id: str) -> dict[str, Any]:
    """The Anthropic message for a non-streamed chat.completion body (one choice)."""
    choice = body["choices"][0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    reasoning = reasoning_of(message)
    if reasoning:
        content.append(thinking_block(reasoning))
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    tool_calls = message.get("tool_calls") or []
    content.extend(tool_use_block(call) for call in tool_calls)
    stop_reason, stop_sequence = stop_reason_of(
        choice.get("finish_reason"), choice.get("stop_reason"), tool_calls=bool(tool_calls))
    return {
        "id": message_id(request_id),
        "type": "message",
        "role": "assistant",
        "model": body.get("model", ""),
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage_of(body.get("usage")),
    }
