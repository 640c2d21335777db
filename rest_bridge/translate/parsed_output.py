"""The engine's typed `parsed` delta fields (reasoning, content, tool-call deltas) -> OpenAI
chat JSON. The parsing itself happens once, in the engine; nothing here reads text.

Reasoning goes out under both names the reference server has used: `reasoning_content` and
the newer `reasoning`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protoserve.v1 import inference_pb2


def tool_call_delta(call: inference_pb2.ToolCallDelta) -> dict[str, Any]:
    """A call's first delta names it (id, type, name); later ones add argument text."""
    if call.id:
        return {"index": call.index, "id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": call.arguments}}
    return {"index": call.index, "function": {"arguments": call.arguments}}


def delta_message(parsed: inference_pb2.ParsedOutput) -> dict[str, Any]:
    """A chat stream delta with only what `parsed` carries."""
    message: dict[str, Any] = {}
    if parsed.reasoning:
        message["reasoning"] = message["reasoning_content"] = parsed.reasoning
    if parsed.content:
        message["content"] = parsed.content
    if parsed.tool_calls:
        message["tool_calls"] = [tool_call_delta(call) for call in parsed.tool_calls]
    return message


@dataclass(slots=True)
class ParsedChoice:
    """A choice's parsed deltas gathered for a non-streamed message."""

    reasoning_parts: list[str] = field(default_factory=list)
    content_parts: list[str] = field(default_factory=list)
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)

    def add(self, parsed: inference_pb2.ParsedOutput) -> None:
        self.reasoning_parts.append(parsed.reasoning)
        self.content_parts.append(parsed.content)
        for delta in parsed.tool_calls:
            call = self.calls.setdefault(delta.index, {
                "id": "", "type": "function", "function": {"name": "", "arguments": ""}})
            call["id"] = delta.id or call["id"]
            call["function"]["name"] += delta.name
            call["function"]["arguments"] += delta.arguments

    def message_fields(self, echo_text: str | None) -> dict[str, Any]:
        """content (null when the model wrote only reasoning and/or calls), reasoning under
        both names (null when none) and tool_calls."""
        text = "".join(self.content_parts)
        tool_calls = [self.calls[index] for index in sorted(self.calls)]
        reasoning = "".join(self.reasoning_parts) or None
        content = (echo_text or "") + text if text or echo_text else None
        if content is None and not tool_calls and reasoning is None:
            content = ""
        return {"content": content, "reasoning": reasoning, "reasoning_content": reasoning,
                "tool_calls": tool_calls}
