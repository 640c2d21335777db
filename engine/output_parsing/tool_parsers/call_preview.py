"""Tool calls announced while they are written: the name as soon as it is complete, then the
arguments in fragments (json_stream), as the reference server streams them.

A format whose calls are JSON objects says what leads to each object (`CallLeads`):

    hermes        <tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>
                  `first`    name announced     arguments sent as they come
    mistral       [TOOL_CALLS] [{"name": ...}, {"name": ...}]
                  `first`                   `between`
    deepseek_v3   <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{args}
                  `first`, naming the call                          the object is the arguments

The preview only announces; the format's own parser still decides what a finished call is,
and MarkerToolStream sends what the preview did not. An object that is not what the format
writes ends the preview for the rest of the choice (its calls are then sent whole); text that
never becomes a lead is simply never previewed.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.output_parsing.tool_parsers.json_stream import COLON, COMMA, KEY, OPEN, JsonNormalizer


@dataclass(frozen=True)
class CallLeads:
    """What precedes each call object: `first` at the start of the region, `between` after a
    previous object (None: the parser takes each call before the next one starts). A `name`
    group in `first` means the object that follows is the arguments."""

    first: re.Pattern[str]
    between: re.Pattern[str] | None = None
    argument_keys: tuple[str, ...] = ("arguments", "parameters")


@dataclass
class Announcement:
    """A call sent to the client before its parser finished it."""

    index: int
    name: str
    arguments_sent: str = ""


class _CallObject:
    """`{"name": ..., "arguments": {...}}` read incrementally: the name once complete, the
    arguments' normalized text as it comes (held until the name is known)."""

    def __init__(self, argument_keys: tuple[str, ...], name: str | None) -> None:
        self.json = JsonNormalizer()
        self.name = name
        self.invalid = False  # a member that no call has (a non-string name)
        self._arguments_only = name is not None
        self._keys = argument_keys
        self._key_text = ""
        self._member: str | None = None
        self._name_text = ""
        self._arguments_key: str | None = None
        self._arguments_streamable = self._arguments_only
        self._held: list[str] = []

    def feed(self, text: str) -> str:
        for piece in self.json.pieces(text):
            if self._arguments_only:
                self._held.append(piece.text)
            elif piece.level == 0:
                continue  # the call object's own braces
            elif piece.level == 1 and piece.kind == KEY:
                self._key_text += piece.text
            elif piece.level == 1 and piece.kind == COLON:
                self._start_member(json.loads(self._key_text))
                self._key_text = ""
            elif piece.level == 1 and piece.kind == COMMA:
                self._member = None
            elif self._member == "name":
                self._read_name(piece.text)
            elif self._member is not None and self._member == self._arguments_key:
                if piece.level == 1 and piece.kind == OPEN:
                    self._arguments_streamable = True
                if self._arguments_streamable:
                    self._held.append(piece.text)
        if self.name is None:
            return ""
        fragments, self._held = "".join(self._held), []
        return fragments

    def _start_member(self, key: str) -> None:
        self._member = key
        if key in self._keys and self._arguments_key is None:
            self._arguments_key = key
        elif key == "name" and self._name_text:
            self._member = None  # a repeated name: the first one counts here

    def _read_name(self, text: str) -> None:
        self._name_text += text
        try:
            name = json.loads(self._name_text)
        except ValueError:
            return  # not complete yet
        if isinstance(name, str):
            self.name = name
        else:
            self.invalid = True


class ArgumentPreview:
    """Announcements for one choice's tool-call region (see the module docstring)."""

    def __init__(self, leads: CallLeads) -> None:
        self._leads = leads
        self._scanned = 0  # region offset read so far
        self._object: _CallObject | None = None
        self._object_start = 0
        self._after_object = False  # `between` (not `first`) leads the next object
        self._current: Announcement | None = None
        self.announced: list[Announcement] = []  # sent, not yet taken by the parser
        self.stopped = False

    def restart(self) -> None:
        """The parser took the region read so far: read the new region from its start."""
        self._scanned, self._object, self._after_object, self._current = 0, None, False, None

    def advance(self, region: str, next_index: int, max_calls: int | None,
                new_id: Callable[[], str]) -> list[dict[str, Any]]:
        """The tool-call deltas that `region` (all of it so far) adds to what was sent."""
        deltas: list[dict[str, Any]] = []
        while not self.stopped:
            if self._object is None and not self._open_object(region):
                break
            assert self._object is not None
            call = self._object
            fragment = call.feed(region[self._scanned:])
            if call.json.failed or call.invalid:
                self.stopped = True
                break
            if call.name is not None and self._current is None:
                index = next_index + len(self.announced)
                if max_calls is not None and index >= max_calls:
                    self.stopped = True
                    break
                self._current = Announcement(index, call.name)
                self.announced.append(self._current)
                deltas.append({"index": index, "id": new_id(), "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
            if fragment and self._current is not None:
                self._current.arguments_sent += fragment
                deltas.append({"index": self._current.index,
                               "function": {"arguments": fragment}})
            if not call.json.complete:
                self._scanned = len(region)
                break
            if self._current is None:  # an object that names no call: not a call after all
                self.stopped = True
                break
            self._scanned = self._object_start + call.json.end
            self._object, self._current, self._after_object = None, None, True
        return _merged(deltas)

    def _open_object(self, region: str) -> bool:
        lead = self._leads.between if self._after_object else self._leads.first
        if lead is None:
            return False
        match = lead.match(region, self._scanned)
        # Not yet, or never (the parser then sends the calls whole). A lead followed by
        # something else may be a longer lead still being written (`<|action_start|><|plu`).
        if match is None or match.end() == len(region) or region[match.end()] != "{":
            return False
        name = match.groupdict().get("name")
        self._object = _CallObject(self._leads.argument_keys,
                                   name.strip() if name is not None else None)
        self._object_start = self._scanned = match.end()
        return True


def _merged(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive fragments of one call as one delta (a fed chunk may hold many)."""
    merged: list[dict[str, Any]] = []
    for delta in deltas:
        last = merged[-1] if merged else None
        if last is not None and last["index"] == delta["index"] and set(delta) == {
                "index", "function"}:
            last["function"]["arguments"] += delta["function"]["arguments"]
        else:
            merged.append(delta)
    return merged
