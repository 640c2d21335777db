"""qwen3_coder (Qwen3-Coder): XML-style calls, any number, after optional content:

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

Parameter values are bare text; each is given the JSON type its tool's schema declares
(integer, number, boolean, object/array as JSON), a string otherwise. A call is sent when its
`</tool_call>` arrives (or at the end of the output, if generation stopped right before it).
"""
from __future__ import annotations

import json
import re
from typing import Any

from engine.output_parsing.tool_parsers.base import ParsedCall, ToolParser

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(r"\s*<tool_call>\s*<function=([^>\n]+)>(.*?)</function>\s*(</tool_call>)?",
                   re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)


def typed_value(text: str, schema: dict[str, Any]) -> Any:
    """`text` as the JSON type `schema` declares; the text itself when it does not fit."""
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    if text == "null" and "null" in kinds:
        return None
    try:
        if "integer" in kinds:
            return int(text)
        if "number" in kinds:
            number = float(text)
            return int(number) if number.is_integer() and "." not in text else number
        if "boolean" in kinds:
            if text.lower() in ("true", "false"):
                return text.lower() == "true"
            raise ValueError(text)
        if "object" in kinds or "array" in kinds:
            return json.loads(text)
    except ValueError:
        return text
    if kind is None:
        # No schema for this parameter: JSON when it reads as JSON, else the text.
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


class Qwen3CoderParser(ToolParser):
    markers = (_OPEN,)

    def parse(self, region: str, final: bool) -> tuple[list[ParsedCall], int]:
        calls: list[ParsedCall] = []
        used = 0
        while (match := _CALL.match(region, used)) is not None:
            if match.group(3) is None and not (final and not region[match.end():].strip()):
                break  # the closing tag may still come
            calls.append(self._call(match.group(1).strip(), match.group(2)))
            used = match.end()
        if final and not region[used:].strip():
            return calls, len(region)
        return calls, used

    def _call(self, name: str, body: str) -> ParsedCall:
        schema = self.parameter_schema(name)
        arguments = {
            key.strip(): typed_value(value, schema.get(key.strip()) or {})
            for key, value in _PARAMETER.findall(body)
        }
        return ParsedCall(name, json.dumps(arguments, ensure_ascii=False))
