"""One response as it is built: the request's echoed fields, the output items, the status,
usage, and the conversation it leaves for `previous_response_id`."""
from __future__ import annotations

import time
from typing import Any

from rest_bridge.responses.output import OutputBuilder, new_item_id, status_of, usage_of
from rest_bridge.responses.schemas import ResponsesRequest
from rest_bridge.responses.translate import ChatMessage, messages_of_items, parse_item

_DEFAULT_TEXT = {"format": {"type": "text"}}


class ResponseDraft:
    def __init__(self, body: ResponsesRequest, model: str,
                 history: list[ChatMessage], turn_input: list[ChatMessage]) -> None:
        self.body = body
        self.id = new_item_id("resp")
        self.created_at = int(time.time())
        self.model = model
        self.output = OutputBuilder()
        self.status = "in_progress"
        self.incomplete_details: dict[str, str] | None = None
        self.error: dict[str, Any] | None = None
        self.usage: dict[str, Any] | None = None
        self._history = history
        self._turn_input = turn_input

    def finish(self, finish_reason: str | None, chat_usage: dict[str, Any] | None) -> None:
        self.status, self.incomplete_details = status_of(finish_reason)
        self.usage = usage_of(chat_usage)

    def fail(self, error: dict[str, Any]) -> None:
        self.status = "failed"
        # Responses' error carries a code from its own list; the message says what happened.
        self.error = {"code": "server_error", "message": str(error.get("message", ""))}

    def to_dict(self) -> dict[str, Any]:
        body = self.body
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "background": False,
            "error": self.error,
            "incomplete_details": self.incomplete_details,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "metadata": body.metadata or {},
            "model": self.model,
            "output": [dict(item) for item in self.output.items]
            if self.status != "in_progress" else [],
            "parallel_tool_calls": body.parallel_tool_calls
            if body.parallel_tool_calls is not None else True,
            "previous_response_id": body.previous_response_id,
            "reasoning": body.reasoning.model_dump(exclude_none=True)
            if body.reasoning is not None else None,
            "store": bool(body.store),
            "temperature": body.temperature,
            "text": body.text.model_dump(by_alias=True, exclude_none=True)
            if body.text is not None else _DEFAULT_TEXT,
            "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
            "tools": body.tools or [],
            "top_p": body.top_p,
            "truncation": body.truncation or "disabled",
            "usage": self.usage,
            "user": body.user,
        }

    def conversation(self) -> list[ChatMessage]:
        """The chat messages a later turn continues: earlier turns, this turn's input, and
        this response's output read back as input items."""
        items = [parse_item(item, index) for index, item in enumerate(self.output.items)]
        return [*self._history, *self._turn_input, *messages_of_items(items)]
