"""Chat output (message deltas, or a whole message) -> Responses output items and the events
that build them.

One builder serves both modes: a stream feeds it each chat chunk's delta and sends the events
it answers; a non-streamed response feeds it the whole chat message once and keeps only the
items. So a stream's events always add up to the non-streamed output.

Items follow the chat message's parts in the order they arrive: reasoning (`reasoning_content`,
or the newer `reasoning`) -> a `reasoning` item; content -> a `message` item with one
`output_text` part; each tool call -> a `function_call` item. A part of another kind closes
the open item (its `.done` events); `finish` closes the last one.
"""
from __future__ import annotations

import uuid
from typing import Any

Event = dict[str, Any]
Item = dict[str, Any]


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def reasoning_text_of(delta: dict[str, Any]) -> str | None:
    """The reasoning text of a chat message or delta, under either field name."""
    if "reasoning_content" in delta:
        return delta["reasoning_content"]
    return delta.get("reasoning")


class OutputBuilder:
    def __init__(self) -> None:
        self.items: list[Item] = []
        # Index in `items` of the item still being written, or None.
        self._open: int | None = None
        # Chat tool-call index -> index in `items` of its function_call item.
        self._calls: dict[int, int] = {}

    def feed_message(self, message: dict[str, Any]) -> list[Event]:
        """A chat message or stream delta: its reasoning, content and tool calls, in order."""
        events: list[Event] = []
        reasoning = reasoning_text_of(message)
        if reasoning:
            events += self.reasoning(reasoning)
        content = message.get("content")
        if content:
            events += self.content(content)
        for position, call in enumerate(message.get("tool_calls") or ()):
            events += self.tool_call(call, position)
        return events

    def reasoning(self, text: str) -> list[Event]:
        events = self._open_item("reasoning")
        index = self._open
        assert index is not None
        item = self.items[index]
        item["content"][0]["text"] += text
        events.append({"type": "response.reasoning_text.delta", "item_id": item["id"],
                       "output_index": index, "content_index": 0, "delta": text})
        return events

    def content(self, text: str) -> list[Event]:
        events = self._open_item("message")
        index = self._open
        assert index is not None
        item = self.items[index]
        item["content"][0]["text"] += text
        events.append({"type": "response.output_text.delta", "item_id": item["id"],
                       "output_index": index, "content_index": 0, "delta": text,
                       "logprobs": []})
        return events

    def tool_call(self, call: dict[str, Any], position: int = 0) -> list[Event]:
        """A chat tool-call delta: the first one of an index starts a function_call item,
        later ones add argument text. `position` stands in for a missing `index` (whole
        messages list their calls without one)."""
        chat_index = call.get("index", position)
        function = call.get("function") or {}
        arguments = function.get("arguments") or ""
        events: list[Event] = []
        index = self._calls.get(chat_index)
        if index is None:
            events += self._close_open()
            item: Item = {"id": new_item_id("fc"), "type": "function_call", "status": "in_progress",
                          "call_id": call.get("id") or new_item_id("call"),
                          "name": function.get("name") or "", "arguments": ""}
            index = self._calls[chat_index] = self._open = len(self.items)
            self.items.append(item)
            events.append({"type": "response.output_item.added", "output_index": index,
                           "item": dict(item)})
        elif self._open != index:
            # A delta for a call already closed: chat streams never interleave calls.
            return events
        item = self.items[index]
        if arguments:
            item["arguments"] += arguments
            events.append({"type": "response.function_call_arguments.delta",
                           "item_id": item["id"], "output_index": index, "delta": arguments})
        return events

    def finish(self) -> list[Event]:
        """Close the open item; an empty output is one empty message, as OpenAI answers it
        (reasoning alone, cut short by max_output_tokens, stays alone)."""
        events = self._close_open()
        if not self.items:
            events += self._open_item("message")
            events += self._close_open()
        return events

    def _open_item(self, kind: str) -> list[Event]:
        """Make an item of `kind` the open one, closing another kind's first."""
        if self._open is not None and self.items[self._open]["type"] == kind:
            return []
        events = self._close_open()
        index = self._open = len(self.items)
        if kind == "message":
            part: dict[str, Any] = {"type": "output_text", "text": "", "annotations": [],
                                    "logprobs": []}
            item: Item = {"id": new_item_id("msg"), "type": "message", "role": "assistant",
                          "status": "in_progress", "content": [part]}
        else:
            part = {"type": "reasoning_text", "text": ""}
            item = {"id": new_item_id("rs"), "type": "reasoning", "status": "in_progress",
                    "summary": [], "content": [part]}
        self.items.append(item)
        added = {**item, "content": []}
        events.append({"type": "response.output_item.added", "output_index": index,
                       "item": added})
        events.append({"type": "response.content_part.added", "item_id": item["id"],
                       "output_index": index, "content_index": 0, "part": dict(part)})
        return events

    def _close_open(self) -> list[Event]:
        index = self._open
        if index is None:
            return []
        self._open = None
        item = self.items[index]
        item["status"] = "completed"
        events: list[Event] = []
        if item["type"] == "function_call":
            events.append({"type": "response.function_call_arguments.done",
                           "item_id": item["id"], "output_index": index,
                           "name": item["name"], "arguments": item["arguments"]})
        else:
            part = item["content"][0]
            base = {"item_id": item["id"], "output_index": index, "content_index": 0}
            if item["type"] == "message":
                events.append({"type": "response.output_text.done", **base,
                               "text": part["text"], "logprobs": []})
            else:
                events.append({"type": "response.reasoning_text.done", **base,
                               "text": part["text"]})
            events.append({"type": "response.content_part.done", **base, "part": dict(part)})
        events.append({"type": "response.output_item.done", "output_index": index,
                       "item": _copy_item(item)})
        return events


def _copy_item(item: Item) -> Item:
    copy = dict(item)
    if "content" in copy:
        copy["content"] = [dict(part) for part in copy["content"]]
    return copy


def status_of(finish_reason: str | None) -> tuple[str, dict[str, str] | None]:
    """The response status and incomplete_details for the chat finish_reason."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "abort":
        return "cancelled", None
    return "completed", None


def usage_of(chat_usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chat usage -> Responses usage (input/output tokens and their details)."""
    if chat_usage is None:
        return None
    details = chat_usage.get("prompt_tokens_details") or {}
    return {
        "input_tokens": chat_usage["prompt_tokens"],
        # Prefix-cache hits; writing to the prefix cache costs nothing apart, hence 0.
        "input_tokens_details": {"cached_tokens": details.get("cached_tokens", 0),
                                 "cache_write_tokens": 0},
        "output_tokens": chat_usage["completion_tokens"],
        # The chat pipeline does not count reasoning tokens apart from the others.
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": chat_usage["total_tokens"],
    }
