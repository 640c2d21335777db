"""The Responses event stream, read off the chat pipeline's chunk stream.

  response.created, response.in_progress
  per output item: response.output_item.added, response.content_part.added,
    response.output_text.delta... / response.reasoning_text.delta...
    / response.function_call_arguments.delta..., their .done events, response.output_item.done
  response.completed (or response.incomplete / response.failed)

Each event is framed as OpenAI frames them (`event: <type>` then `data: <json>`), numbered by
`sequence_number`. An error inside the chat stream becomes an `error` event followed by
response.failed. The finished response is handed to `on_done` (the store) before the last
event goes out, so a client that reads it can GET it at once.
"""
from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable
from typing import Any

from rest_bridge.responses.draft import ResponseDraft
from rest_bridge.responses.translate import responses_param
from rest_bridge.sse import parse_sse_events

_TERMINAL_EVENTS = {"completed": "response.completed", "incomplete": "response.incomplete",
                    "failed": "response.failed", "cancelled": "response.failed"}


def named_event(payload: dict[str, Any]) -> bytes:
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"event: {payload['type']}\ndata: {data}\n\n".encode()


class EventNumbering:
    """Stamps each event with the stream's next sequence_number and frames it."""

    def __init__(self) -> None:
        self._next = 0

    def frame(self, event: dict[str, Any]) -> bytes:
        event = {"type": event["type"], "sequence_number": self._next,
                 **{key: value for key, value in event.items() if key != "type"}}
        self._next += 1
        return named_event(event)


async def responses_events(
    draft: ResponseDraft,
    chat_frames: AsyncGenerator[bytes, None],
    on_done: Callable[[ResponseDraft], None],
) -> AsyncGenerator[bytes, None]:
    numbering = EventNumbering()
    try:
        yield numbering.frame({"type": "response.created", "response": draft.to_dict()})
        yield numbering.frame({"type": "response.in_progress", "response": draft.to_dict()})
        finish_reason: str | None = None
        usage: dict[str, Any] | None = None
        error: dict[str, Any] | None = None
        async for frame in chat_frames:
            for chunk in parse_sse_events(frame):
                if not isinstance(chunk, dict):
                    continue  # [DONE]
                if "error" in chunk:
                    error = chunk["error"]
                    continue
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or ():
                    for event in draft.output.feed_message(choice.get("delta") or {}):
                        yield numbering.frame(event)
                    finish_reason = choice.get("finish_reason") or finish_reason
        for event in draft.output.finish():
            yield numbering.frame(event)
        if error is not None:
            yield numbering.frame({"type": "error", "code": error.get("code") or error.get("type"),
                                   "message": error.get("message", ""),
                                   "param": responses_param(error.get("param"))})
            draft.fail(error)
        else:
            draft.finish(finish_reason, usage)
        on_done(draft)
        yield numbering.frame({"type": _TERMINAL_EVENTS[draft.status],
                               "response": draft.to_dict()})
    finally:
        # Closing the chat stream cancels its engine call (a client gone mid-stream).
        await chat_frames.aclose()
