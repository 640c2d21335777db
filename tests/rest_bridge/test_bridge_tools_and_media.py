"""Tool calls and media through the bridge subprocess in front of the scripted engine: parsed
calls in plain and streamed responses, tool_choice rules, and media refused at the door."""
from __future__ import annotations

import base64
import json
import struct
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from bridge_processes import start_bridge, stop_process_group
from engine_process import starts_servers
from scripted_engine import ScriptedEngine

from rest_bridge.sse import parse_sse_events
from engine.output_parsing.tool_parsers import StreamPiece, merge_pieces

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}}}
HERMES_OUTPUT = ('Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
                 '</tool_call>')


@pytest.fixture(scope="module")
@starts_servers
def tool_bridge_url(scripted_engine: ScriptedEngine) -> Iterator[str]:
    process, base_url = start_bridge(
        f"127.0.0.1:{scripted_engine.port}", "--enable-auto-tool-choice",
        "--tool-call-parser", "hermes", "--allowed-media-domains", "images.example",
        "--max-media-bytes", "4096", "--max-image-pixels", "10000")
    yield base_url
    stop_process_group(process)


def _chat(url: str, **body: Any) -> httpx.Response:
    body.setdefault("model", "scripted-model")
    request_id = f"t-{uuid.uuid4().hex[:12]}"
    return httpx.post(f"{url}/v1/chat/completions", json=body,
                      headers={"X-Request-Id": request_id}, timeout=30)


def _say(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"say:{text}"}]


def test_auto_tool_calls_plain_and_streamed_agree(tool_bridge_url: str) -> None:
    plain = _chat(tool_bridge_url, messages=_say(HERMES_OUTPUT), tools=[WEATHER])
    assert plain.status_code == 200, plain.text
    (choice,) = plain.json()["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Checking."
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}

    streamed = _chat(tool_bridge_url, messages=_say(HERMES_OUTPUT), tools=[WEATHER], stream=True)
    chunks = [e for e in parse_sse_events(streamed.content) if isinstance(e, dict)]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    pieces = [StreamPiece(d.get("content") or "", d.get("tool_calls", [])) for d in deltas]
    content, calls = merge_pieces(pieces)
    assert content == "Checking."
    assert [c["function"] for c in calls] == [call["function"]]
    # The call is announced by name, its arguments follow in fragments as they are written,
    # and the last chunk ends the choice as tool_calls.
    call_deltas = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")]
    assert call_deltas[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert call_deltas[0]["id"].startswith("chatcmpl-tool-")
    assert len(call_deltas) > 2 and all("name" not in d["function"] for d in call_deltas[1:])
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_choice_none_sends_no_tools_and_parses_nothing(
    tool_bridge_url: str, scripted_engine: ScriptedEngine
) -> None:
    response = _chat(tool_bridge_url, messages=_say(HERMES_OUTPUT), tools=[WEATHER],
                     tool_choice="none", parallel_tool_calls=True, user="u-1")
    (choice,) = response.json()["choices"]
    assert choice["message"]["content"] == HERMES_OUTPUT and choice["message"]["tool_calls"] == []
    assert choice["finish_reason"] == "stop"
    last = scripted_engine.record.calls_snapshot()[-1].request
    assert len(last.chat.tools) == 0 and last.chat.tool_choice == "none"


def test_named_and_required_tool_choice_become_schema_constraints(
    tool_bridge_url: str, scripted_engine: ScriptedEngine
) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    response = _chat(tool_bridge_url, messages=_say('{"city": "Oslo"}'), tools=[WEATHER],
                     tool_choice=named)
    (choice,) = response.json()["choices"]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"] == {
        "name": "get_weather", "arguments": '{"city": "Oslo"}'}
    sent = scripted_engine.record.calls_snapshot()[-1].request
    assert json.loads(sent.constraint.json_schema) == WEATHER["function"]["parameters"]

    output = '[{"name": "get_weather", "parameters": {"city": "Rome"}}]'
    response = _chat(tool_bridge_url, messages=_say(output), tools=[WEATHER],
                     tool_choice="required")
    (choice,) = response.json()["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["arguments"] == '{"city": "Rome"}'
    schema = json.loads(scripted_engine.record.calls_snapshot()[-1].request.constraint.json_schema)
    assert schema["type"] == "array" and schema["minItems"] == 1


@pytest.mark.parametrize(("body", "param"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "required", "guided_regex": "a+"}, "tool_choice"),
])
def test_tool_choice_errors(tool_bridge_url: str, body: dict[str, Any], param: str) -> None:
    body = {"tools": [WEATHER], **body}
    response = _chat(tool_bridge_url, messages=_say("x"), **body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_explicit_auto_without_a_parser_is_refused(bridge_url: str) -> None:
    response = _chat(bridge_url, messages=_say("x"), tools=[WEATHER], tool_choice="auto")
    assert response.status_code == 400
    assert "--enable-auto-tool-choice" in response.json()["error"]["message"]
    implied = _chat(bridge_url, messages=_say(HERMES_OUTPUT), tools=[WEATHER])
    assert implied.json()["choices"][0]["message"]["content"] == HERMES_OUTPUT


def png(width: int, height: int) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(header)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)))


def _image(url: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [
        {"type": "text", "text": "say:ok"},
        {"type": "image_url", "image_url": {"url": url, "detail": "high"}}]}]


def _data_url(media_type: str, data: bytes) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


@pytest.mark.parametrize(("url", "message"), [
    ("http://evil.example/x.png", "not allowed"),
    ("file:///etc/passwd", "scheme 'file'"),
    (_data_url("image/png", png(1000, 1000)), "exceeds the server's limit of 10000 pixels"),
    (_data_url("image/png", b"\0" * 5000), "larger than the server's limit of 4096 bytes"),
    ("data:image/png;base64," + "A" * 10_000_000, "larger than the server's limit"),
    ("data:image/png;base64,@@@@", "not valid base64"),
    (_data_url("image/png", b"not an image"), "not a PNG, JPEG, GIF or WebP"),
    (_data_url("text/plain", b"hi"), "image/* media type"),
])
def test_media_refused_before_the_engine(
    tool_bridge_url: str, scripted_engine: ScriptedEngine, url: str, message: str
) -> None:
    before = len(scripted_engine.record.calls_snapshot())
    response = _chat(tool_bridge_url, messages=_image(url))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == "messages.0.content.1.image_url"
    assert len(scripted_engine.record.calls_snapshot()) == before


def test_acceptable_media_reach_the_engine(
    tool_bridge_url: str, scripted_engine: ScriptedEngine
) -> None:
    for url in (_data_url("image/png", png(50, 50)), "https://images.example/cat.png"):
        response = _chat(tool_bridge_url, messages=_image(url))
        assert response.status_code == 200, response.text
        part = scripted_engine.record.calls_snapshot()[-1].request.chat.messages[0].parts.parts[1]
        assert part.image_url.url == url and part.image_url.detail == "high"
    audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": base64.b64encode(b"\0" * 5000).decode(), "format": "wav"}}]}]
    response = _chat(tool_bridge_url, messages=audio)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages.0.content.0.input_audio.data"
