"""Tool calls read by the engine's parsers on the real engine, through the OpenAI SDK: a
guided regex makes the tiny random model write a pythonic call list (Llama 3.2/4 format),
which the engine reads into tool_calls, streamed and not; `parallel_tool_calls: false`
returns only the first call; a `--tool-parser-plugin` file's parser serves the same way."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from engine_process import EngineProcess
from openai import OpenAI

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}}}
TWO_CALLS = r'\[get_weather\(city="(Paris|Rome)"\), get_weather\(city="(Oslo|Bern)"\)\]'


@pytest.fixture(scope="module")
def client(shared_server: Callable[..., EngineProcess]) -> OpenAI:
    server = shared_server("--enable-auto-tool-choice", "--tool-call-parser", "pythonic",
                           role="all")
    return OpenAI(base_url=f"{server.http_url}/v1", api_key="x", max_retries=0, timeout=120)


def _args(client: OpenAI, **extra: Any) -> dict[str, Any]:
    return dict(model=client.models.list().data[0].id,
                messages=[{"role": "user", "content": "Weather in two cities?"}],
                tools=[WEATHER], temperature=1.0, seed=5, max_tokens=60,
                extra_body={"guided_regex": TWO_CALLS}, **extra)


def _streamed_calls(client: OpenAI, args: dict[str, Any]) -> tuple[str, list[dict], str]:
    content, calls, finish = "", {}, ""
    for chunk in client.chat.completions.create(**args, stream=True):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or ():
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = delta.id or call["id"]
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_pythonic_calls_plain_and_streamed_agree(client: OpenAI) -> None:
    args = _args(client)
    choice = client.chat.completions.create(**args).choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    calls = [(c.function.name, json.loads(c.function.arguments))
             for c in choice.message.tool_calls]
    assert [name for name, _ in calls] == ["get_weather", "get_weather"]
    assert calls[0][1]["city"] in ("Paris", "Rome") and calls[1][1]["city"] in ("Oslo", "Bern")
    content, streamed, finish = _streamed_calls(client, args)
    assert (content, finish) == ("", "tool_calls")
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == calls
    assert all(c["id"].startswith("chatcmpl-tool-") for c in streamed)


def test_parallel_tool_calls_false_returns_one_call(client: OpenAI) -> None:
    args = _args(client, parallel_tool_calls=False)
    choice = client.chat.completions.create(**args).choices[0]
    (call,) = choice.message.tool_calls
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    _, streamed, _ = _streamed_calls(client, args)
    assert [json.loads(c["arguments"]) for c in streamed] == [
        json.loads(call.function.arguments)]


PLUGIN = """
import json
from engine.output_parsing import register_tool_parser
from engine.output_parsing.tool_parsers import ParsedCall, ToolParser

@register_tool_parser("call_line")
class CallLine(ToolParser):
    # CALL <name> <json arguments>, at the start of the output.
    markers = ("CALL ",)
    only_at_start = True

    def parse(self, region, final):
        if not final:
            return [], 0
        name, _, arguments = region.strip().removeprefix("CALL ").partition(" ")
        try:
            return [ParsedCall(name, json.dumps(json.loads(arguments)))], len(region)
        except ValueError:
            return [], 0
"""


@pytest.fixture(scope="module")
def plugin_client(shared_server: Callable[..., EngineProcess],
                  tmp_path_factory: pytest.TempPathFactory) -> OpenAI:
    plugin = Path(tmp_path_factory.mktemp("plugin")) / "call_line.py"
    plugin.write_text(PLUGIN)
    server = shared_server("--tool-parser-plugin", str(plugin), "--enable-auto-tool-choice",
                           "--tool-call-parser", "call_line", role="all")
    return OpenAI(base_url=f"{server.http_url}/v1", api_key="x", max_retries=0, timeout=120)


def test_a_plugin_parser_reads_calls(plugin_client: OpenAI) -> None:
    args = _args(plugin_client)
    args["extra_body"] = {"guided_regex": r'CALL get_weather \{"city": "(Paris|Rome)"\}'}
    choice = plugin_client.chat.completions.create(**args).choices[0]
    (call,) = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    _, streamed, finish = _streamed_calls(plugin_client, args)
    assert finish == "tool_calls"
    assert [json.loads(c["arguments"]) for c in streamed] == [json.loads(call.function.arguments)]
