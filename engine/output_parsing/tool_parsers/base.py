"""Turning model output text into OpenAI tool calls, incrementally.

A `ToolCallStream` is fed the text of one choice as it is generated and answers with the part
of it that is plain content and the tool calls completed so far, as OpenAI stream deltas.
A non-streamed response runs the same stream over the whole text at once (`extract`), so the
deltas of a stream always add up to the non-streamed message.

Marker parsers (hermes, mistral, llama3_json) hand text through as content until their
marker starts a tool-call region; partial markers are held back so a marker split across
deltas is still found. Region text that does not parse is returned as content after all.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

from engine.output_parsing.tool_parsers.call_preview import ArgumentPreview, CallLeads


def new_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass(slots=True)
class StreamPiece:
    """What one fed delta (or the finish) adds: content text and tool-call deltas."""

    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)


@dataclass(frozen=True, slots=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text


class ToolCallStream(Protocol):
    @property
    def found_calls(self) -> bool: ...

    def feed(self, text: str) -> StreamPiece: ...

    def finish(self) -> StreamPiece: ...


class RegionParser(Protocol):
    """One tool-call syntax: where its region starts and how the region splits into calls."""

    markers: tuple[str, ...]
    # True: the region only counts when the output starts with a marker (after whitespace).
    only_at_start: bool
    # Formats whose calls are JSON objects: what leads to each, so calls are announced and
    # their arguments streamed while written (call_preview); None: sent whole once parsed.
    call_leads: CallLeads | None

    def parse(self, region: str, final: bool) -> tuple[list[ParsedCall], int]:
        """The calls complete at the start of `region` and how many characters they used,
        stopping at the first that does not parse. `final`: no more text will come."""
        ...


class ToolParser:
    """Base of every tool-call syntax (built-in or a plugin's): a RegionParser built with the
    request's tool definitions ({"type": "function", "function": {...}}), which formats that
    write every argument as text (qwen3_coder) need to give the arguments their JSON types."""

    markers: ClassVar[tuple[str, ...]] = ()
    only_at_start: ClassVar[bool] = False
    call_leads: ClassVar[CallLeads | None] = None

    def __init__(self, tools: Sequence[dict[str, Any]] = ()) -> None:
        self.tools = list(tools)

    def parse(self, region: str, final: bool) -> tuple[list[ParsedCall], int]:
        raise NotImplementedError

    def parameter_schema(self, function_name: str) -> dict[str, Any]:
        """The JSON schema `properties` of a tool's parameters ({} when unknown)."""
        for tool in self.tools:
            function = tool.get("function") or {}
            if function.get("name") == function_name:
                return (function.get("parameters") or {}).get("properties") or {}
        return {}


def call_from_object(value: Any, arguments_keys: tuple[str, ...]) -> ParsedCall:
    """{"name": ..., "arguments"|"parameters": {...}} -> ParsedCall; ValueError otherwise."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise ValueError("a tool call needs a string 'name'")
    arguments: Any = {}
    for key in arguments_keys:
        if key in value:
            arguments = value[key]
            break
    if isinstance(arguments, str):
        # Some models write the arguments as JSON text already.
        arguments = json.loads(arguments)
    return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def decode_json_values(text: str, separators: str = "") -> list[Any]:
    """Every JSON value in `text`, separated by whitespace or `separators`; ValueError on
    anything else."""
    decoder = json.JSONDecoder()
    values, position = [], 0
    skip = " \t\r\n" + separators
    while True:
        while position < len(text) and text[position] in skip:
            position += 1
        if position == len(text):
            return values
        value, position = decoder.raw_decode(text, position)
        values.append(value)


class MarkerToolStream:
    """Content until a parser's marker, then tool calls out of the region that follows."""

    def __init__(
        self,
        parser: RegionParser,
        new_id: Callable[[], str] = new_tool_call_id,
        max_calls: int | None = None,
    ) -> None:
        """`max_calls`: calls past this many are dropped (1 for parallel_tool_calls false)."""
        self._parser = parser
        self._max_calls = max_calls
        self._new_id = new_id
        self._held = ""  # content not yet sent: it might be the start of a marker
        self._region: str | None = None  # text from the marker on, once found
        self._num_calls = 0
        self._seen_text = False
        leads = getattr(parser, "call_leads", None)  # plugins written before it may lack it
        self._preview = ArgumentPreview(leads) if leads is not None else None

    @property
    def found_calls(self) -> bool:
        return self._num_calls > 0 or bool(self._preview and self._preview.announced)

    def feed(self, text: str) -> StreamPiece:
        if self._region is not None:
            self._region += text
            return self._take_calls(final=False)
        held = self._held + text
        start = self._marker_start(held)
        if start is not None:
            self._held, self._region = "", held[start:]
            piece = self._take_calls(final=False)
            piece.content = held[:start] + piece.content
            return piece
        keep = self._possible_marker_prefix(held)
        self._held = held[len(held) - keep:] if keep else ""
        sent = held[: len(held) - keep]
        self._seen_text = self._seen_text or bool(sent.strip())
        return StreamPiece(content=sent)

    def finish(self) -> StreamPiece:
        if self._region is None:
            held, self._held = self._held, ""
            return StreamPiece(content=held)
        piece = self._take_calls(final=True)
        # Whatever did not parse as a call is what the model wrote: content after all.
        piece.content, self._region = self._region, ""
        return piece

    def _take_calls(self, final: bool) -> StreamPiece:
        assert self._region is not None
        calls, used = self._parser.parse(self._region, final)
        self._region = self._region[used:]
        piece = StreamPiece()
        preview = self._preview
        for call in calls:
            if self._max_calls is not None and self._num_calls >= self._max_calls:
                break
            announced = preview.announced.pop(0) if preview and preview.announced else None
            if announced is not None:
                # The preview sent the name and the arguments so far: only the rest goes now.
                # (Were they not a prefix, as with a repeated key, what was sent stands.)
                sent = announced.arguments_sent
                if call.arguments.startswith(sent) and len(call.arguments) > len(sent):
                    piece.tool_calls.append({"index": announced.index,
                                             "function": {"arguments": call.arguments[len(sent):]}})
            else:
                piece.tool_calls.append(
                    {
                        "index": self._num_calls,
                        "id": self._new_id(),
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                )
            self._num_calls += 1
        if preview is not None:
            if used:
                preview.restart()
            if not final:
                piece.tool_calls.extend(preview.advance(
                    self._region, self._num_calls, self._max_calls, self._new_id))
        return piece

    def _marker_start(self, text: str) -> int | None:
        if self._parser.only_at_start:
            if self._seen_text:
                return None
            stripped = len(text) - len(text.lstrip())
            rest = text[stripped:]
            return stripped if any(rest.startswith(m) for m in self._parser.markers) else None
        found = [text.find(m) for m in self._parser.markers if m in text]
        return min(found) if found else None

    def _possible_marker_prefix(self, text: str) -> int:
        """Length of the longest tail of `text` that could begin a marker."""
        if self._parser.only_at_start:
            # Before any visible text, whitespace or a marker's beginning may be a marker yet.
            start = text.lstrip()
            could_be = any(marker.startswith(start) for marker in self._parser.markers)
            return len(text) if not self._seen_text and could_be else 0
        longest = 0
        for marker in self._parser.markers:
            for size in range(min(len(marker) - 1, len(text)), 0, -1):
                if text.endswith(marker[:size]):
                    longest = max(longest, size)
                    break
        return longest


class NamedFunctionStream:
    """tool_choice names a function: the whole output is its arguments (constrained to its
    JSON schema), streamed as argument fragments of one call."""

    def __init__(self, name: str, new_id: Callable[[], str] = new_tool_call_id) -> None:
        self._name = name
        self._new_id = new_id
        self._started = False

    @property
    def found_calls(self) -> bool:
        return self._started

    def feed(self, text: str) -> StreamPiece:
        if not text:
            return StreamPiece()
        if self._started:
            return StreamPiece(tool_calls=[{"index": 0, "function": {"arguments": text}}])
        self._started = True
        call = {"index": 0, "id": self._new_id(), "type": "function",
                "function": {"name": self._name, "arguments": text}}
        return StreamPiece(tool_calls=[call])

    def finish(self) -> StreamPiece:
        return StreamPiece()


def merge_pieces(pieces: list[StreamPiece]) -> tuple[str, list[dict[str, Any]]]:
    """Content and complete tool calls from a stream's pieces, as a client accumulates them."""
    content = "".join(piece.content for piece in pieces)
    calls: dict[int, dict[str, Any]] = {}
    for piece in pieces:
        for delta in piece.tool_calls:
            call = calls.setdefault(
                delta["index"], {"id": "", "type": "function",
                                 "function": {"name": "", "arguments": ""}}
            )
            call["id"] = delta.get("id", call["id"])
            function = delta.get("function", {})
            call["function"]["name"] += function.get("name", "")
            call["function"]["arguments"] += function.get("arguments", "")
    return content, [calls[index] for index in sorted(calls)]


def extract(stream: ToolCallStream, text: str) -> tuple[str, list[dict[str, Any]]]:
    """The non-streamed result: the whole text through the same stream."""
    return merge_pieces([stream.feed(text), stream.finish()])
