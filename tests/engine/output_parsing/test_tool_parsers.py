"""Tool-call parsers on scripted model output in each format's documented shape: the
non-streamed result, and streams cut at every possible place (and in random chunkings)
adding up to exactly that result."""
from __future__ import annotations

import itertools
import json
import random
from typing import Any

import pytest

from engine.output_parsing.tool_parsers import (
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


# qwen3_coder writes every argument as text; the tool's schema gives them their JSON types.
TOOLS = [{"type": "function", "function": {"name": "forecast", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "metric": {"type": "boolean"}}}}}]


def _stream(kind: str, max_calls: int | None = None) -> ToolCallStream:
    if kind == "required":
        return MarkerToolStream(RequiredParser(), _ids(), max_calls)
    if kind.startswith("named:"):
        return NamedFunctionStream(kind.removeprefix("named:"), _ids())
    return MarkerToolStream(TOOL_PARSERS[kind](TOOLS), _ids(), max_calls)


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
    # Llama 3.2 / 4: a Python list of calls, read with ast (never run).
    ("pythonic", '[weather(city="Paris"), forecast(city="東京", days=2)]', "",
     [_call(0, "weather", PARIS), _call(1, "forecast", TOKYO)]),
    ("pythonic", "<|python_start|>[weather(city='Paris')]<|python_end|>", "",
     [_call(0, "weather", PARIS)]),
    ("pythonic", "[weather(city=__import__('os').getcwd())]",
     "[weather(city=__import__('os').getcwd())]", []),
    ("pythonic", "Answer: [1, 2]", "Answer: [1, 2]", []),
    ("qwen3_coder", "I'll look.\n<tool_call>\n<function=forecast>\n<parameter=city>\n東京\n"
     "</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>",
     "I'll look.\n", [_call(0, "forecast", TOKYO)]),
    ("qwen3_coder", "<tool_call>\n<function=weather>\n<parameter=city>\nParis\n</parameter>\n"
     "</function>\n</tool_call>\n<tool_call>\n<function=forecast>\n<parameter=city>\n東京\n"
     "</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>", "",
     [_call(0, "weather", PARIS), _call(1, "forecast", TOKYO)]),
    ("qwen3_coder", "<tool_call>\n<function=weather>\n<parameter=city>\nParis\n</parameter>\n"
     "</function>", "", [_call(0, "weather", PARIS)]),
    ("deepseek_v3", "Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>weather\n"
     '```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function'
     '<｜tool▁sep｜>forecast\n```json\n{"city": "東京", "days": 2}\n```<｜tool▁call▁end｜>'
     "<｜tool▁calls▁end｜>", "Sure.",
     [_call(0, "weather", PARIS), _call(1, "forecast", TOKYO)]),
    ("deepseek_v3", "<｜tool▁calls▁begin｜>broken", "<｜tool▁calls▁begin｜>broken", []),
    ("granite", '<|tool_call|>[{"name": "weather", "arguments": {"city": "Paris"}}, '
     '{"name": "forecast", "arguments": {"city": "東京", "days": 2}}]', "",
     [_call(0, "weather", PARIS), _call(1, "forecast", TOKYO)]),
    ("granite", '<tool_call>[{"name": "weather", "arguments": {"city": "Paris"}}]', "",
     [_call(0, "weather", PARIS)]),
    ("granite", "No tools needed.", "No tools needed.", []),
    ("internlm", 'Let me check.<|action_start|><|plugin|>\n{"name": "weather", '
     '"parameters": {"city": "Paris"}}<|action_end|>', "Let me check.",
     [_call(0, "weather", PARIS)]),
    ("internlm", "<|action_start|><|plugin|>\n{oops}", "<|action_start|><|plugin|>\n{oops}", []),
    ("jamba", ' <tool_calls>[{"name": "weather", "arguments": {"city": "Paris"}}, '
     '{"name": "forecast", "arguments": {"city": "東京", "days": 2}}]</tool_calls>', " ",
     [_call(0, "weather", PARIS), _call(1, "forecast", TOKYO)]),
    ("jamba", "<tool_calls>[]</tool_calls>", "<tool_calls>[]</tool_calls>", []),
    # Arguments as models really write them: no spaces, escapes, nested values, number forms;
    # the call's arguments are json.dumps of them, streamed or not.
    ("hermes", '<tool_call>{"name":"forecast","arguments":{"city":"T\\u00f6ky\\"o\\n",'
     '"days":12,"opts":{"x":[1,2.50,1E2,true,null],"y":{}}}}</tool_call>', "",
     [_call(0, "forecast", {"city": 'Töky"o\n', "days": 12,
                            "opts": {"x": [1, 2.5, 100.0, True, None], "y": {}}})]),
    # The name after the arguments: announced once the name is complete.
    ("mistral", '[TOOL_CALLS] [{"arguments": {"city": "Paris"}, "name": "weather"}]', "",
     [_call(0, "weather", PARIS)]),
    # Arguments written as a JSON string: sent whole when the call is complete.
    ("hermes", '<tool_call>{"name": "weather", "arguments": "{\\"city\\": \\"Paris\\"}"}'
     "</tool_call>", "", [_call(0, "weather", PARIS)]),
]

# Formats whose calls are JSON objects: announced by name, arguments streamed as written.
STREAMING_KINDS = [kind for kind, parser in TOOL_PARSERS.items() if parser.call_leads] + [
    "required"]


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
    chunking = random.Random(kind + text)
    for _ in range(20):
        stream, pieces, start = _stream(kind), [], 0
        while start < len(text):
            end = start + chunking.randint(0, 9)
            pieces.append(stream.feed(text[start:end]))
            start = end
        pieces.append(stream.finish())
        assert merge_pieces(pieces) == expected


def test_every_registered_parser_has_a_case() -> None:
    assert set(TOOL_PARSERS) <= {kind for kind, *_ in CASES}


@pytest.mark.parametrize("kind", ["hermes", "pythonic", "qwen3_coder", "deepseek_v3", "granite",
                                  "jamba", "mistral", "llama3_json", "required"])
def test_parallel_tool_calls_false_returns_only_the_first_call(kind: str) -> None:
    text = next(text for k, text, _, calls in CASES if k == kind and len(calls) > 1) \
        if kind != "required" else ('[{"name": "weather", "parameters": {"city": "Paris"}}, '
                                    '{"name": "forecast", "parameters": {"city": "東京", "days": 2}}]')
    _, calls = extract(_stream(kind, max_calls=1), text)
    assert [call["function"]["name"] for call in calls] == ["weather"]


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


@pytest.mark.parametrize("kind", STREAMING_KINDS)
def test_json_calls_are_announced_by_name_and_their_arguments_sent_as_written(kind: str) -> None:
    text, calls = next((text, calls) for k, text, _, calls in CASES if k == kind and calls)
    stream, seen = _stream(kind), []
    for position, char in enumerate(text):
        seen += [(position, delta) for delta in stream.feed(char).tool_calls]
    seen += [(len(text), delta) for delta in stream.finish().tool_calls]
    first_call = [(position, delta) for position, delta in seen if delta["index"] == 0]
    header_at, header = first_call[0]
    assert header["function"]["name"] == calls[0]["function"]["name"]
    assert header["id"] == "call-0"
    # The name goes out before the arguments are written, the arguments in several pieces,
    # the last before the text that follows the arguments has been generated.
    assert header_at < text.index('"city"')
    pieces = [(position, delta["function"]["arguments"]) for position, delta in first_call]
    assert "".join(piece for _, piece in pieces) == calls[0]["function"]["arguments"]
    assert len(pieces) > 3 and all("name" not in delta["function"] for _, delta in first_call[1:])
    assert pieces[-1][0] < len(text) - 1


def test_parallel_tool_calls_false_announces_only_the_first_call_while_streaming() -> None:
    text = next(text for k, text, _, calls in CASES if k == "mistral" and len(calls) > 1)
    stream = _stream("mistral", max_calls=1)
    pieces = [stream.feed(char) for char in text] + [stream.finish()]
    _, calls = merge_pieces(pieces)
    assert [call["function"]["name"] for call in calls] == ["weather"]
    assert calls[0]["function"]["arguments"] == json.dumps(PARIS)
