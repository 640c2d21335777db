"""One choice's output read as reasoning, content and tool calls, incrementally.

    text delta -> ReasoningStream (if a reasoning parser) -> reasoning | content
                                                   content -> ToolCallStream (if tools)
                                                              -> content | tool-call deltas

Tool calls are only looked for after the reasoning: a call written while thinking is part
of the thought, not a call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.output_parsing.reasoning import ReasoningPiece, ReasoningStream
from engine.output_parsing.tool_parsers import StreamPiece, ToolCallStream


@dataclass(slots=True)
class OutputPiece:
    """What one fed delta (or the finish) adds to a choice."""

    reasoning: str = ""
    content: str = ""
    # OpenAI stream deltas: {"index", "id"?, "type"?, "function": {"name"?, "arguments"}}.
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def extend(self, other: OutputPiece) -> None:
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)


class ChoiceParser(Protocol):
    """What the serving side drives per choice (ChoiceOutputParser, HarmonyChoiceParser)."""

    @property
    def found_calls(self) -> bool: ...

    def feed(self, text: str) -> OutputPiece: ...

    def finish(self) -> OutputPiece: ...


class ChoiceOutputParser:
    def __init__(self, reasoning: ReasoningStream | None, tools: ToolCallStream | None) -> None:
        self._reasoning = reasoning
        self._tools = tools

    @property
    def found_calls(self) -> bool:
        return self._tools is not None and self._tools.found_calls

    def feed(self, text: str) -> OutputPiece:
        split = self._reasoning.feed(text) if self._reasoning else ReasoningPiece(content=text)
        return self._with_tools(split, self._tools.feed(split.content) if self._tools else None)

    def finish(self) -> OutputPiece:
        split = self._reasoning.finish() if self._reasoning else ReasoningPiece()
        if self._tools is None:
            return self._with_tools(split, None)
        fed, rest = self._tools.feed(split.content), self._tools.finish()
        return self._with_tools(split, StreamPiece(fed.content + rest.content,
                                                   fed.tool_calls + rest.tool_calls))

    @staticmethod
    def _with_tools(split: ReasoningPiece, tools: StreamPiece | None) -> OutputPiece:
        if tools is None:
            return OutputPiece(split.reasoning, split.content)
        return OutputPiece(split.reasoning, tools.content, tools.tool_calls)
