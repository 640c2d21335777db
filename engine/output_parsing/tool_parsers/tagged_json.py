"""Formats that wrap JSON calls in the model's own tags.

- deepseek_v3: `<｜tool▁calls▁begin｜>` then per call
  `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{args}\\n```<｜tool▁call▁end｜>`,
  then `<｜tool▁calls▁end｜>`. Each call is sent when its end tag arrives.
- granite (Granite 3.x): the output is `<|tool_call|>` (3.0) or `<tool_call>` (3.1) and a JSON
  list of `{"name", "arguments"}`.
- internlm (InternLM 2.5): content, then `<|action_start|><|plugin|>` and one JSON
  `{"name", "parameters"}`, then `<|action_end|>`.
- jamba (Jamba 1.5): content, then `<tool_calls>` and a JSON list of `{"name", "arguments"}`,
  then `</tool_calls>`.
"""
from __future__ import annotations

import json
import re

from engine.output_parsing.tool_parsers.base import (
    ParsedCall,
    ToolParser,
    call_from_object,
    decode_json_values,
)
from engine.output_parsing.tool_parsers.call_preview import CallLeads
from engine.output_parsing.tool_parsers.json_calls import LIST_ITEM, WholeRegionParser

_DS_BEGIN, _DS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
_DS_CALL = re.compile(
    r"\s*(?:<｜tool▁calls▁begin｜>)?\s*<｜tool▁call▁begin｜>(\w+)<｜tool▁sep｜>([^\n]+)\n"
    r"```(?:json)?\n(.*?)\n```\s*<｜tool▁call▁end｜>",
    re.DOTALL,
)


class DeepSeekV3Parser(ToolParser):
    markers = (_DS_BEGIN,)
    call_leads = CallLeads(re.compile(
        r"\s*(?:<｜tool▁calls▁begin｜>)?\s*<｜tool▁call▁begin｜>\w+<｜tool▁sep｜>(?P<name>[^\n]+)\n"
        r"```(?:json)?\n"))

    def parse(self, region: str, final: bool) -> tuple[list[ParsedCall], int]:
        calls: list[ParsedCall] = []
        used = 0
        while (match := _DS_CALL.match(region, used)) is not None:
            try:
                arguments = json.loads(match.group(3))
            except ValueError:
                break
            calls.append(ParsedCall(match.group(2).strip(),
                                    json.dumps(arguments, ensure_ascii=False)))
            used = match.end()
        rest = region[used:].strip()
        if final and rest in ("", _DS_END, _DS_BEGIN + _DS_END):
            return calls, len(region)
        return calls, used


class GraniteParser(WholeRegionParser):
    markers = ("<|tool_call|>", "<tool_call>")
    argument_keys = ("arguments", "parameters")
    call_leads = CallLeads(re.compile(r"\s*(?:<\|tool_call\|>|<tool_call>)\s*\[?\s*"), LIST_ITEM)


class _ClosedJsonRegion(ToolParser):
    """`open` marker, JSON call(s), optional `close` tag; parsed once closed (or at the end)."""

    open_tag = ""
    close_tag = ""
    prefixes: tuple[str, ...] = ()
    argument_keys: tuple[str, ...] = ("arguments", "parameters")

    def parse(self, region: str, final: bool) -> tuple[list[ParsedCall], int]:
        close = region.find(self.close_tag)
        if close < 0 and not final:
            return [], 0
        end = close + len(self.close_tag) if close >= 0 else len(region)
        body = region[:close if close >= 0 else len(region)].strip()
        for prefix in (self.open_tag, *self.prefixes):
            body = body.removeprefix(prefix).lstrip()
        try:
            values = decode_json_values(body)
            flat = [v for value in values for v in (value if isinstance(value, list) else [value])]
            if not flat:
                return [], 0
            calls = [call_from_object(value, self.argument_keys) for value in flat]
        except ValueError:
            return [], 0
        # Text after the closing tag stays in the region: content, returned at the finish.
        return calls, end


class InternLMParser(_ClosedJsonRegion):
    markers = ("<|action_start|>",)
    open_tag, close_tag = "<|action_start|>", "<|action_end|>"
    prefixes = ("<|plugin|>",)
    argument_keys = ("parameters", "arguments")
    call_leads = CallLeads(re.compile(r"\s*<\|action_start\|>\s*(?:<\|plugin\|>)?\s*"),
                           argument_keys=("parameters", "arguments"))


class JambaParser(_ClosedJsonRegion):
    markers = ("<tool_calls>",)
    open_tag, close_tag = "<tool_calls>", "</tool_calls>"
    call_leads = CallLeads(re.compile(r"\s*<tool_calls>\s*\[?\s*"), LIST_ITEM)
