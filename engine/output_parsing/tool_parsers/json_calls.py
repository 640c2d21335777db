"""Calls written as bare JSON, parsed once the output is complete.

- llama3_json: the output is `{"name": ..., "parameters": {...}}` (optionally after
  `<|python_tag|>`), several separated by `;`.
- mistral: content, then `[TOOL_CALLS]` and a JSON list of `{"name", "arguments"}`.
- required (tool_choice "required"): the output is a JSON list of `{"name", "parameters"}`,
  held to that shape by the schema constraint the request carries.
"""
from __future__ import annotations

import re
from typing import Any, ClassVar

from engine.output_parsing.tool_parsers.base import (
    ParsedCall,
    ToolParser,
    call_from_object,
    decode_json_values,
)
from engine.output_parsing.tool_parsers.call_preview import CallLeads

# Between the calls of a JSON list.
LIST_ITEM = re.compile(r"\s*,\s*")


def _calls(values: list[Any], keys: tuple[str, ...]) -> list[ParsedCall]:
    flat: list[Any] = []
    for value in values:
        flat.extend(value if isinstance(value, list) else [value])
    if not flat:
        raise ValueError("no tool call")
    return [call_from_object(value, keys) for value in flat]


class WholeRegionParser(ToolParser):
    markers: ClassVar[tuple[str, ...]] = ()
    only_at_start = True
    separators = ""
    argument_keys: ClassVar[tuple[str, ...]] = ("parameters", "arguments")

    def parse(self, region: str, final: bool) -> tuple[list[ParsedCall], int]:
        if not final:
            return [], 0
        body = region.lstrip()
        for marker in self.markers:
            # Strip only word-like markers; "{" and "[" belong to the JSON itself.
            if marker.isascii() and marker[0] in "<[" and len(marker) > 1:
                body = body.removeprefix(marker)
        try:
            return _calls(decode_json_values(body, self.separators), self.argument_keys), len(
                region
            )
        except ValueError:
            return [], 0


class Llama3JsonParser(WholeRegionParser):
    markers = ("<|python_tag|>", "{")
    separators = ";"
    call_leads = CallLeads(re.compile(r"\s*(?:<\|python_tag\|>)?\s*"), re.compile(r"\s*;\s*"),
                           ("parameters", "arguments"))


class MistralParser(WholeRegionParser):
    markers = ("[TOOL_CALLS]",)
    only_at_start = False
    argument_keys = ("arguments", "parameters")
    call_leads = CallLeads(re.compile(r"\s*\[TOOL_CALLS\]\s*\[?\s*"), LIST_ITEM)


class RequiredParser(WholeRegionParser):
    markers = ("[",)
    call_leads = CallLeads(re.compile(r"\s*\[\s*"), LIST_ITEM, ("parameters", "arguments"))
