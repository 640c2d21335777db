"""gpt-oss's harmony format: the output is a series of messages on named channels.

    <|channel|>analysis<|message|>chain of thought<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"location":"Tokyo"}<|call|>
    <|start|>assistant<|channel|>final<|message|>The answer.<|return|>

(The prompt ends with `<|start|>assistant`, so the first header starts at `<|channel|>`.)
A message's header is everything before `<|message|>`; its body runs to `<|end|>`, `<|call|>`
or `<|return|>` (the last two are stop tokens, usually not in the text at all).

    analysis                           -> reasoning, streamed
    final, commentary without `to=`    -> content, streamed
    a header with `to=functions.NAME`  -> a tool call NAME(body), sent when its body ends

Text that never reaches `<|message|>` (a model not writing harmony) is content, at the end.
The end of the reasoning is several tokens here, so a constraint cannot be gated behind it
(engine.server.parsed_output refuses that combination).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable

from engine.output_parsing.choice_parser import OutputPiece
from engine.output_parsing.tool_parsers.base import new_tool_call_id

MESSAGE = "<|message|>"
_TERMINATORS = ("<|end|>", "<|call|>", "<|return|>")
MARKERS = ("<|channel|>", MESSAGE, *_TERMINATORS)
_CHANNEL = re.compile(r"<\|channel\|>\s*(\w+)")
_RECIPIENT = re.compile(r"\bto=functions\.([^\s<]+)")


class HarmonyChoiceParser:
    """One choice's harmony output -> reasoning, content and tool calls, incrementally."""

    def __init__(self, read_calls: bool, max_calls: int | None = None,
                 new_id: Callable[[], str] = new_tool_call_id) -> None:
        self._read_calls = read_calls
        self._max_calls = max_calls
        self._new_id = new_id
        self._buffer = ""
        self._in_body = False
        self._channel = ""
        self._recipient: str | None = None
        self._arguments = ""
        self._num_calls = 0

    @property
    def found_calls(self) -> bool:
        return self._num_calls > 0

    def feed(self, text: str) -> OutputPiece:
        piece = OutputPiece()
        self._buffer += text
        while True:
            if not self._in_body:
                end = self._buffer.find(MESSAGE)
                if end < 0:
                    return piece
                self._open(self._buffer[:end])
                self._buffer = self._buffer[end + len(MESSAGE):]
                continue
            found = [(self._buffer.find(t), t) for t in _TERMINATORS if t in self._buffer]
            if found:
                end, terminator = min(found)
                self._body(piece, self._buffer[:end])
                self._close(piece)
                self._buffer = self._buffer[end + len(terminator):]
                continue
            keep = _partial_tail(self._buffer)
            self._body(piece, self._buffer[:len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep:]
            return piece

    def finish(self) -> OutputPiece:
        piece = OutputPiece()
        rest, self._buffer = self._buffer, ""
        if self._in_body:
            self._body(piece, rest)
            self._close(piece)
        else:
            piece.content += rest  # never became a harmony message
        return piece

    def _open(self, header: str) -> None:
        channel = _CHANNEL.search(header)
        recipient = _RECIPIENT.search(header)
        self._channel = channel.group(1) if channel else ""
        self._recipient = recipient.group(1) if recipient and self._read_calls else None
        self._in_body, self._arguments = True, ""

    def _body(self, piece: OutputPiece, text: str) -> None:
        if self._recipient is not None:
            self._arguments += text
        elif self._channel == "analysis":
            piece.reasoning += text
        else:
            piece.content += text

    def _close(self, piece: OutputPiece) -> None:
        if self._recipient is not None and (
                self._max_calls is None or self._num_calls < self._max_calls):
            try:
                arguments = json.dumps(json.loads(self._arguments), ensure_ascii=False)
            except ValueError:
                arguments = self._arguments  # as written: the client sees what the model said
            piece.tool_calls.append({
                "index": self._num_calls, "id": self._new_id(), "type": "function",
                "function": {"name": self._recipient, "arguments": arguments}})
            self._num_calls += 1
        self._in_body, self._recipient = False, None


def _partial_tail(text: str) -> int:
    """Length of the longest tail of `text` that may begin a terminator."""
    for size in range(min(len(text), max(map(len, _TERMINATORS)) - 1), 0, -1):
        if any(t.startswith(text[-size:]) for t in _TERMINATORS):
            return size
    return 0
