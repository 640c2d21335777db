"""Tool-call parsers on scripted model output: the non-streamed result, and streams cut at
every possible place adding up to exactly that result."""
from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from rest_bridge.tool_parsers import (
    TOOL_PARSERS,
    MarkerToolStream,
    NamedFunctionStream,
    RequiredParser,
    ToolCallStream,
    extract,
    merge_pieces,
)


def _ids() -> Any:
    counter = itertools.count()
    return lambda: f"call-{next(counter)}"


def _stream(kind: str) -> ToolCallStream:
    if kind == "required":
        return MarkerToolStream(RequiredParser(), _ids())
    if kind.startswith("named:"):
        return NamedFunctionStream(kind.removeprefix("named:"), _ids())
    return MarkerToolStream(TOOL_PARSERS[kind](), _ids())


def _call(index: int, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"call-{index}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


PARIS = {"city": "Paris"}
TOKYO = {"city": "東京", "days": 2}
CASES: list[tuple[str, str, str, list[dict[str, Any]]]] = [
    ("hermes", "plain answer, no call", "plain answer, no call", []),
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}'
     '\n</tool_call>', "Let me check.\n", [_call(0, "weather", PARIS)]),
    ("hermes", '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>\n'
     '<tool_call>{"name": "forecast", "arguments": {"city": "東京", "days": 2}}</tool_call>',
     "", [_call(0, "weather", PARIS), _call(1, "forecast", TOKYO)]),
    ("hermes", '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}', "",
     [_call(0, "weather", PARIS)]),
    ("hermes", "<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    ("hermes", "a < b and <tool_ is not a tag", "a < b and <tool_ is not a tag", []),
    ("llama3_json", '{"name": "weather", "parameters": {"city": "Paris"}}', "",
     [_call(0, "weather", PARIS)]),
    ("llama3_json", '<|python_tag|>{"name": "weather", "parameters": {"city": "Paris"}}; '
     '{"name": "forecast", "parameters": {"city": "東京", "days": 2}}', "",
     [_call(0, "weather", PARIS), _call(1, "forecast", TOKYO)]),
    ("llama3_json", 'The JSON is {"name": "x"}', 'The JSON is {"name": "x"}', []),
    ("llama3_json", '{"not": "a call"}', '{"not": "a call"}', []),
    ("mistral", 'Sure. [TOOL_CALLS] [{"name": "weather", "arguments": {"city": "Paris"}}, '
     '{"name": "forecast", "arguments": {"city": "東京", "days": 2}}]', "Sure. ",
     [_call(0, "weather", PARIS), _call(1, "forecast", TOKYO)]),
    ("mistral", "[TOOL_CALLS] oops", "[TOOL_CALLS] oops", []),
    ("required", '[{"name": "weather", "parameters": {"city": "Paris"}}]', "",
     [_call(0, "weather", PARIS)]),
    ("named:weather", '{"city": "Paris"}', "",
     [{"id": "call-0", "type": "function",
       "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]),
]


@pytest.mark.parametrize(("kind", "text", "content", "calls"), CASES)
def test_non_streamed_extraction(
    kind: str, text: str, content: str, calls: list[dict[str, Any]]
) -> None:
    assert extract(_stream(kind), text) == (content, calls)


@pytest.mark.parametrize(("kind", "text", "content", "calls"), CASES)
def test_streamed_deltas_add_up_to_the_non_streamed_result(
    kind: str, text: str, content: str, calls: list[dict[str, Any]]
) -> None:
    expected = extract(_stream(kind), text)
    for size in (1, 2, 3, 7):
        stream = _stream(kind)
        pieces = [stream.feed(text[i:i + size]) for i in range(0, len(text), size)]
        pieces.append(stream.finish())
        assert merge_pieces(pieces) == expected, size
        assert stream.found_calls == bool(calls)
    for cut in range(len(text) + 1):
        stream = _stream(kind)
        pieces = [stream.feed(text[:cut]), stream.feed(text[cut:]), stream.finish()]
        assert merge_pieces(pieces) == expected, cut


def test_hermes_sends_each_call_when_it_closes_and_content_as_it_comes() -> None:
    stream = _stream("hermes")
    assert stream.feed("Checking ").content == "Checking "
    assert stream.feed("<tool").content == ""
    piece = stream.feed('_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>')
    assert piece.tool_calls == [{"index": 0, **_call(0, "weather", PARIS)}]
    assert stream.found_calls


def test_named_function_streams_argument_fragments() -> None:
    stream = _stream("named:weather")
    first, second = stream.feed('{"city": '), stream.feed('"Paris"}')
    assert first.tool_calls[0]["function"] == {"name": "weather", "arguments": '{"city": '}
    assert second.tool_calls == [{"index": 0, "function": {"arguments": '"Paris"}'}}]
