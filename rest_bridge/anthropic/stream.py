"""`chat.completion.chunk` SSE frames -> Anthropic's streaming events.

The chat run streams with usage on every chunk, so the first chunk already knows the prompt's
token count. Events, each framed `event: <type>\\ndata: <json>\\n\\n`:

  message_start (usage.input_tokens), ping
  per block, in output order: content_block_start, content_block_delta..., content_block_stop
      reasoning text -> a "thinking" block (thinking_delta)
      content text   -> a "text" block (text_delta)
      a tool call    -> a "tool_use" block (input_json_delta: the arguments as they stream)
    a change of kind closes the open block and starts the next one
  message_delta (stop_reason, stop_sequence, usage.output_tokens), message_stop

An error inside the chat stream becomes an `error` event and ends the stream (no
message_stop), as Anthropic's API does.
"""
from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

from rest_bridge.anthropic.errors import anthropic_error_body
from rest_bridge.anthropic.from_chat import message_id, reasoning_of, stop_reason_of, usage_of
from rest_bridge.sse import parse_sse_events

# The HTTP status whose Anthropic error type an in-stream error takes, by OpenAI type.
_STATUS_OF_OPENAI_TYPE = {
    "invalid_request_error": 400,
    "rate_limit_error": 429,
    "service_unavailable_error": 503,
    "timeout_error": 504,
}


def anthropic_event(payload: dict[str, Any]) -> bytes:
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"event: {payload['type']}\ndata: {data}\n\n".encode()


class MessageEventWriter:
    """One Anthropic message's events from the chunks of one chat choice."""

    def __init__(self, request_id: str) -> None:
        self._request_id = request_id
        self._started = False
        self._usage: dict[str, int] = {"input_tokens": 0, "output_tokens": 0}
        # The open block: its kind and index (None: no block open).
        self._open_kind: str | None = None
        self._num_blocks = 0
        # OpenAI tool-call index -> the index of its tool_use block.
        self._tool_blocks: dict[int, int] = {}
        self._finish_reason: str | None = None
        self._matched_stop: int | str | None = None

    def on_chunk(self, chunk: dict[str, Any]) -> list[bytes]:
        events: list[bytes] = []
        if chunk.get("usage"):
            self._usage = usage_of(chunk["usage"])
        if not self._started:
            events.extend(self._opening(chunk))
        for choice in chunk.get("choices") or ():
            events.extend(self._on_delta(choice.get("delta") or {}))
            if choice.get("finish_reason") is not None:
                self._finish_reason = choice["finish_reason"]
                self._matched_stop = choice.get("stop_reason")
        return events

    def on_error(self, error: dict[str, Any]) -> list[bytes]:
        """The chat stream's error envelope, as Anthropic's error event."""
        status = _STATUS_OF_OPENAI_TYPE.get(str(error.get("type")), 500)
        body = anthropic_error_body(str(error.get("message", "")), status,
                                    param=error.get("param"))
        return [anthropic_event(body)]

    def closing(self) -> list[bytes]:
        events = [] if self._started else self._opening({})
        events.extend(self._close_block())
        stop_reason, stop_sequence = stop_reason_of(
            self._finish_reason, self._matched_stop, tool_calls=bool(self._tool_blocks))
        events.append(anthropic_event({
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            "usage": {"output_tokens": self._usage["output_tokens"]},
        }))
        events.append(anthropic_event({"type": "message_stop"}))
        return events

    def _opening(self, chunk: dict[str, Any]) -> list[bytes]:
        self._started = True
        message = {
            "id": message_id(self._request_id),
            "type": "message",
            "role": "assistant",
            "model": chunk.get("model", ""),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self._usage["input_tokens"], "output_tokens": 0},
        }
        return [anthropic_event({"type": "message_start", "message": message}),
                anthropic_event({"type": "ping"})]

    def _on_delta(self, delta: dict[str, Any]) -> list[bytes]:
        events: list[bytes] = []
        reasoning = reasoning_of(delta)
        if reasoning:
            events.extend(self._block_delta("thinking", {"type": "thinking_delta",
                                                         "thinking": reasoning}))
        if delta.get("content"):
            events.extend(self._block_delta("text", {"type": "text_delta",
                                                     "text": delta["content"]}))
        for call in delta.get("tool_calls") or ():
            events.extend(self._tool_call_delta(call))
        return events

    def _block_delta(self, kind: str, delta: dict[str, Any]) -> list[bytes]:
        events: list[bytes] = []
        if self._open_kind != kind:
            events.extend(self._close_block())
            block: dict[str, Any] = ({"type": "text", "text": ""} if kind == "text" else
                                     {"type": "thinking", "thinking": "", "signature": ""})
            events.append(self._start_block(kind, block))
        events.append(anthropic_event({"type": "content_block_delta",
                                       "index": self._num_blocks - 1, "delta": delta}))
        return events

    def _tool_call_delta(self, call: dict[str, Any]) -> list[bytes]:
        events: list[bytes] = []
        call_index = int(call.get("index", 0))
        function = call.get("function") or {}
        if call_index not in self._tool_blocks:
            events.extend(self._close_block())
            block = {"type": "tool_use", "id": call.get("id") or "",
                     "name": function.get("name") or "", "input": {}}
            events.append(self._start_block("tool_use", block))
            self._tool_blocks[call_index] = self._num_blocks - 1
        arguments = function.get("arguments")
        if arguments:
            events.append(anthropic_event({
                "type": "content_block_delta", "index": self._tool_blocks[call_index],
                "delta": {"type": "input_json_delta", "partial_json": arguments},
            }))
        return events

    def _start_block(self, kind: str, block: dict[str, Any]) -> bytes:
        self._open_kind = kind
        self._num_blocks += 1
        return anthropic_event({"type": "content_block_start", "index": self._num_blocks - 1,
                                "content_block": block})

    def _close_block(self) -> list[bytes]:
        if self._open_kind is None:
            return []
        self._open_kind = None
        return [anthropic_event({"type": "content_block_stop", "index": self._num_blocks - 1})]


async def message_events(
    chat_frames: AsyncGenerator[bytes, None], request_id: str
) -> AsyncGenerator[bytes, None]:
    """The Anthropic event stream of a streamed chat run. Closing this closes the chat
    stream, which cancels its engine calls."""
    writer = MessageEventWriter(request_id)
    try:
        async for frame in chat_frames:
            for payload in parse_sse_events(frame):
                if isinstance(payload, str):  # "[DONE]"
                    continue
                if "error" in payload and "choices" not in payload:
                    for event in writer.on_error(payload["error"]):
                        yield event
                    return
                for event in writer.on_chunk(payload):
                    yield event
        for event in writer.closing():
            yield event
    finally:
        await chat_frames.aclose()
