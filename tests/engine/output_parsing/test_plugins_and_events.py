"""--tool-parser-plugin files, engine-serve's start-up checks of parser names, and the
serving side's parsed events: held text flushed on the last delta or before a Finished that
no delta announced, and FINISH_REASON_TOOL_CALLS."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from engine.core.request import FinishReason
from engine.errors import InvalidRequestError
from engine.generation import GenerationDelta, GenerationFinished, GenerationStarted
from engine.output_parsing import TOOL_PARSERS, resolve_plan
from engine.output_parsing.plugins import load_tool_parser_plugin
from engine.output_parsing.tool_parsers import MarkerToolStream, extract
from engine.server.parsed_output import ParsedOutputWriter, parsing_plan_of
from engine.server.request_tracker import ServingOptions
from protoserve.cli.parser_args import check_output_parser_args, parsing_defaults
from protoserve.v1 import inference_pb2

PLUGIN = '''
import json
from engine.output_parsing import register_tool_parser
from engine.output_parsing.tool_parsers import ParsedCall, ToolParser

@register_tool_parser("test_call_lines")
class CallLines(ToolParser):
    """CALL name {json} per line."""
    markers = ("CALL ",)

    def parse(self, region, final):
        if not final:
            return [], 0
        calls = []
        for line in region.strip().splitlines():
            name, _, arguments = line.removeprefix("CALL ").partition(" ")
            calls.append(ParsedCall(name, json.dumps(json.loads(arguments))))
        return calls, len(region)
'''


def _args(**values) -> argparse.Namespace:
    base = {"tool_parser_plugin": None, "tool_call_parser": None, "reasoning_parser": None,
            "enable_auto_tool_choice": False}
    return argparse.Namespace(**{**base, **values})


def test_a_plugin_file_registers_a_parser(tmp_path: Path) -> None:
    plugin = tmp_path / "call_lines.py"
    plugin.write_text(PLUGIN)
    args = _args(tool_parser_plugin=str(plugin), tool_call_parser="test_call_lines",
                 enable_auto_tool_choice=True)
    try:
        check_output_parser_args(args)
        stream = MarkerToolStream(TOOL_PARSERS["test_call_lines"]())
        content, calls = extract(stream, 'Sure.\nCALL weather {"city": "Paris"}')
        assert content == "Sure.\n"
        assert calls[0]["function"] == {"name": "weather", "arguments": '{"city": "Paris"}'}
        assert parsing_defaults(args) == {"reasoning_parser": "", "auto_tool_parser":
                                          "test_call_lines"}
    finally:
        TOOL_PARSERS.pop("test_call_lines", None)


@pytest.mark.parametrize(("values", "message"), [
    ({"tool_parser_plugin": "/nonexistent/plugin.py"}, "--tool-parser-plugin"),
    ({"tool_call_parser": "nope"}, "--tool-call-parser"),
    ({"reasoning_parser": "nope"}, "--reasoning-parser"),
])
def test_bad_parser_flags_name_the_flag(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_output_parser_args(_args(**values))


def test_a_failing_plugin_names_the_flag(tmp_path: Path) -> None:
    plugin = tmp_path / "broken.py"
    plugin.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match="--tool-parser-plugin.*boom"):
        load_tool_parser_plugin(str(plugin))


def _run(writer: ParsedOutputWriter, events) -> list[inference_pb2.GenerateResponse]:
    out = []
    for event in events:
        if isinstance(event, GenerationDelta):
            response = inference_pb2.GenerateResponse(delta=inference_pb2.GenerateDelta(
                index=event.index, text=event.text, last=event.last))
        elif isinstance(event, GenerationFinished):
            response = inference_pb2.GenerateResponse(finished=inference_pb2.GenerateFinished(
                index=event.index, reason=inference_pb2.FINISH_REASON_STOP))
        else:
            response = inference_pb2.GenerateResponse()
        out.extend(writer.responses(event, response))
    return out


TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]


def test_calls_end_the_choice_as_tool_calls_and_the_last_delta_flushes() -> None:
    plan = resolve_plan(reasoning_parser="deepseek_r1", tool_parser="hermes",
                        tool_choice="auto", tools=TOOLS)
    text = 'ok</think><tool_call>{"name": "weather", "arguments": {}}</tool_call>'
    events = [GenerationStarted("r", [], "<think>\n", 0)]
    events += [GenerationDelta(0, [i], text[i:i + 5], last=i + 5 >= len(text))
               for i in range(0, len(text), 5)]
    events.append(GenerationFinished(0, FinishReason.STOP, 1))
    out = _run(ParsedOutputWriter(plan), events)
    deltas = [r.delta for r in out if r.WhichOneof("event") == "delta"]
    assert len(deltas) == len(events) - 2  # no extra flush delta: the last one carried it
    assert "".join(d.parsed.reasoning for d in deltas) == "ok"
    # One call, announced by name and then sent in argument fragments.
    fragments = [c for d in deltas for c in d.parsed.tool_calls]
    assert {c.index for c in fragments} == {0} and fragments[0].name == "weather"
    assert "".join(c.arguments for c in fragments) == "{}"
    assert out[-1].finished.reason == inference_pb2.FINISH_REASON_TOOL_CALLS


def test_a_choice_ended_without_a_last_delta_gets_its_held_text_first() -> None:
    plan = resolve_plan(reasoning_parser="qwen3", tool_parser="", tool_choice=None, tools=[])
    events = [GenerationStarted("r", [], "assistant\n", 0), GenerationDelta(0, [1], "<thi"),
              GenerationFinished(0, FinishReason.ABORT, 1)]
    out = _run(ParsedOutputWriter(plan), events)
    assert [r.WhichOneof("event") for r in out] == [None, "delta", "delta", "finished"]
    assert out[1].delta.parsed.content == "" and out[2].delta.parsed.content == "<thi"
    assert not out[2].delta.token_ids


def test_which_requests_are_parsed() -> None:
    options = ServingOptions(reasoning_parser="qwen3")
    chat = inference_pb2.GenerateRequest()
    chat.chat.messages.add(role="user", text="hi")
    assert parsing_plan_of(chat, options).reasoning.name == "qwen3"
    assert parsing_plan_of(inference_pb2.GenerateRequest(text="hi"), options) is None
    chat.return_text = False
    assert parsing_plan_of(chat, options) is None
    chat.parsing.reasoning_parser = "qwen3"
    with pytest.raises(InvalidRequestError) as raised:
        parsing_plan_of(chat, options)
    assert raised.value.field == "return_text"
