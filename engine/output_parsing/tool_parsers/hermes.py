"""Hermes-style calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number,
after optional content. Each call is sent as soon as its closing tag arrives."""
from __future__ import annotations

import json
import re

from engine.output_parsing.tool_parsers.base import ParsedCall, ToolParser, call_from_object
from engine.output_parsing.tool_parsers.call_preview import CallLeads

_OPEN = "<tool_call>"
_CALL = re.compile(r"\s*<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_ARGUMENT_KEYS = ("arguments", "parameters")


class HermesParser(ToolParser):
    markers = (_OPEN,)
    only_at_start = False
    call_leads = CallLeads(re.compile(r"\s*<tool_call>\s*"))

    def parse(self, region: str, final: bool) -> tuple[list[ParsedCall], int]:
        calls: list[ParsedCall] = []
        used = 0
        while (match := _CALL.match(region, used)) is not None:
            try:
                calls.append(call_from_object(json.loads(match.group(1)), _ARGUMENT_KEYS))
            except ValueError:
                return calls, used
            used = match.end()
        rest = region[used:].strip()
        if final and rest.startswith(_OPEN):
            # Generation ended (EOS, a stop string) before the closing tag.
            try:
                calls.append(call_from_object(json.loads(rest[len(_OPEN):]), _ARGUMENT_KEYS))
            except ValueError:
                return calls, used
            return calls, len(region)
        if final and not rest:
            return calls, len(region)
        return calls, used
