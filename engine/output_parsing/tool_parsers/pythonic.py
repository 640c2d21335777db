"""pythonic (Llama 3.2 / Llama 4): the output is a Python list of calls with keyword
arguments, `[get_weather(city="Paris"), forecast(city="Tokyo", days=2)]`, optionally inside
Llama 4's `<|python_start|>` ... `<|python_end|>`.

Read with `ast` (parse, then literal_eval of each argument): the text is never executed.
A list that is not only calls of plain names with literal keyword arguments is content.
"""
from __future__ import annotations

import ast
import json

from engine.output_parsing.tool_parsers.base import ParsedCall, ToolParser

_START, _END = "<|python_start|>", "<|python_end|>"


def calls_of(text: str) -> list[ParsedCall]:
    """The calls a Python list expression makes; ValueError for anything else."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as error:
        raise ValueError(f"not a Python expression: {error}") from None
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        raise ValueError("pythonic tool calls are a non-empty list")
    calls = []
    for node in tree.body.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            raise ValueError("each item must be name(keyword=literal, ...)")
        arguments = {}
        for keyword in node.keywords:
            if keyword.arg is None:  # **kwargs
                raise ValueError("keyword arguments only")
            arguments[keyword.arg] = ast.literal_eval(keyword.value)
        calls.append(ParsedCall(node.func.id, json.dumps(arguments, ensure_ascii=False)))
    return calls


class PythonicParser(ToolParser):
    markers = (_START, "[")
    only_at_start = True

    def parse(self, region: str, final: bool) -> tuple[list[ParsedCall], int]:
        if not final:
            return [], 0
        body = region.strip().removeprefix(_START).removesuffix(_END)
        try:
            return calls_of(body), len(region)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return [], 0
