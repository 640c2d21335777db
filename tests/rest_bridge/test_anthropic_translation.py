"""The Anthropic Messages surface's translation, without an engine: requests onto the chat
request the OpenAI route would take, chat bodies and chunks back into Anthropic's shapes (read
by the official anthropic SDK's own models and stream accumulator), and its errors."""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message
from bridge_processes import reserve_port
from fastapi.testclient import TestClient

from rest_bridge.anthropic.from_chat import message_from_chat, stop_reason_of
from rest_bridge.anthropic.schemas import CountTokensRequest, ErrorResponse, MessagesRequest
from rest_bridge.anthropic.stream import MessageEventWriter
from rest_bridge.anthropic.to_chat import chat_request_from
from rest_bridge.app import create_app
from rest_bridge.openai_schemas.chat import ChatCompletionRequest
from rest_bridge.settings import BridgeSettings
from rest_bridge.translate.chat_input import chat_input_from

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}},
                  "required": ["city"]}
# A 1x1 PNG.
PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kg"
       "AAAABJRU5ErkJggg==")


def anthropic_request(**fields: Any) -> MessagesRequest:
    body = {
        "model": "tiny",
        "max_tokens": 32,
        "system": [{"type": "text", "text": "Be brief. "}, {"type": "text", "text": "Be kind."}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Weather in Paris?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": PNG}},
            ]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "I should call the tool.", "signature": "s"},
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                 "input": {"city": "Paris"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1",
                 "content": [{"type": "text", "text": "18C"}]},
                {"type": "text", "text": "And tomorrow?"},
            ]},
        ],
        "tools": [{"name": "get_weather", "description": "Weather for a city",
                   "input_schema": WEATHER_SCHEMA}],
    }
    body.update(fields)
    return MessagesRequest.model_validate(body)


def openai_equivalent(**fields: Any) -> ChatCompletionRequest:
    """The same conversation as an OpenAI client writes it."""
    body = {
        "model": "tiny",
        "max_tokens": 32,
        "messages": [
            {"role": "system", "content": "Be brief. Be kind."},
            {"role": "user", "content": [
                {"type": "text", "text": "Weather in Paris?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            ]},
            {"role": "assistant", "content": [{"type": "text", "text": "Let me look."}],
             "tool_calls": [{"id": "toolu_1", "type": "function", "function": {
                 "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
            {"role": "tool", "tool_call_id": "toolu_1",
             "content": [{"type": "text", "text": "18C"}]},
            {"role": "user", "content": [{"type": "text", "text": "And tomorrow?"}]},
        ],
        "tools": [{"type": "function", "function": {
            "name": "get_weather", "description": "Weather for a city",
            "parameters": WEATHER_SCHEMA}}],
    }
    body.update(fields)
    return ChatCompletionRequest.model_validate(body)


def test_conversation_renders_the_chat_input_of_its_openai_equivalent() -> None:
    translated = chat_request_from(anthropic_request()).request
    assert chat_input_from(translated) == chat_input_from(openai_equivalent())
    assert translated.max_tokens == 32


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, "auto"),
    ({"type": "any"}, "required"),
    ({"type": "none"}, "none"),
    ({"type": "tool", "name": "get_weather"},
     {"type": "function", "function": {"name": "get_weather"}}),
])
def test_tool_choice(choice: dict[str, Any], expected: Any) -> None:
    translated = chat_request_from(anthropic_request(tool_choice=choice)).request
    assert translated.tool_choice == openai_equivalent(tool_choice=expected).tool_choice
    assert translated.parallel_tool_calls is None
    choice = {**choice, "disable_parallel_tool_use": True} if choice["type"] != "none" else choice
    translated = chat_request_from(anthropic_request(tool_choice=choice)).request
    assert translated.parallel_tool_calls is (False if choice["type"] != "none" else None)


def test_sampling_stop_metadata_thinking_and_stream_fields() -> None:
    translated = chat_request_from(anthropic_request(
        temperature=0.5, top_p=0.9, top_k=20, stop_sequences=["\n\nHuman:"],
        metadata={"user_id": "u-1"}, thinking={"type": "enabled", "budget_tokens": 1024},
        stream=True,
    )).request
    assert (translated.temperature, translated.top_p, translated.top_k) == (0.5, 0.9, 20)
    assert translated.stop == ["\n\nHuman:"] and translated.user == "u-1"
    assert translated.chat_template_kwargs == {"enable_thinking": True}
    # message_start needs the prompt's tokens, message_delta the output count.
    assert translated.stream and translated.stream_options is not None
    assert translated.stream_options.continuous_usage_stats
    # Unset sampling fields stay unset: the engine's (generation-config) defaults apply.
    plain = chat_request_from(anthropic_request()).request
    assert not {"temperature", "top_p", "top_k", "stop"} & plain.model_fields_set


def test_output_config_format_is_a_json_schema_response_format() -> None:
    translated = chat_request_from(anthropic_request(output_config={
        "effort": "low", "format": {"type": "json_schema", "schema": WEATHER_SCHEMA}})).request
    assert translated.response_format is not None
    assert translated.response_format.type == "json_schema"
    assert translated.response_format.json_schema is not None
    assert translated.response_format.json_schema.json_schema == WEATHER_SCHEMA


def test_count_tokens_body_translates_without_generation_fields() -> None:
    body = CountTokensRequest.model_validate({
        "model": "tiny", "system": "Be brief.",
        "messages": [{"role": "user", "content": "Hi"}]})
    translated = chat_request_from(body).request
    assert [m.role for m in translated.messages] == ["system", "user"]
    assert translated.max_tokens is None and not translated.stream


def test_chat_errors_name_the_anthropic_block() -> None:
    translation = chat_request_from(anthropic_request())
    # system, user, assistant, tool (from messages.2's first block), user.
    assert translation.client_field("messages.1.content.1.image_url") == (
        "messages.0.content.1.image_url")
    assert translation.client_field("messages.3.content") == "messages.2.content.0.content"
    assert translation.client_field("stop") == "stop_sequences"


def test_non_streamed_body_becomes_a_message_the_sdk_reads() -> None:
    body = {
        "id": "chatcmpl-r1", "object": "chat.completion", "created": 0, "model": "tiny",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "stop_reason": None,
                     "message": {"role": "assistant", "content": "Checking.",
                                 "reasoning_content": "Need the tool.",
                                 "tool_calls": [{"id": "call_1", "type": "function",
                                                 "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Rome"}'}}]}}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    }
    message = Message.model_validate(message_from_chat(body, "r1"))
    assert message.id == "msg_r1" and message.stop_reason == "tool_use"
    assert [block.type for block in message.content] == ["thinking", "text", "tool_use"]
    assert message.content[0].thinking == "Need the tool."
    assert message.content[2].input == {"city": "Rome"} and message.content[2].id == "call_1"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (11, 7)


@pytest.mark.parametrize(("finish", "matched", "calls", "expected"), [
    ("stop", None, False, ("end_turn", None)),
    ("stop", 2, False, ("end_turn", None)),
    ("stop", "END", False, ("stop_sequence", "END")),
    ("length", None, False, ("max_tokens", None)),
    ("length", None, True, ("max_tokens", None)),
    ("tool_calls", None, True, ("tool_use", None)),
    # A named tool choice finishes with "stop" and a call.
    ("stop", None, True, ("tool_use", None)),
])
def test_stop_reasons(finish: str, matched: Any, calls: bool, expected: tuple) -> None:
    assert stop_reason_of(finish, matched, tool_calls=calls) == expected


def chunk(delta: dict[str, Any], *, finish: str | None = None, stop: Any = None,
          completion_tokens: int = 0) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                              "finish_reason": finish}
    if finish is not None:
        choice["stop_reason"] = stop
    return {"id": "chatcmpl-r2", "object": "chat.completion.chunk", "created": 0,
            "model": "tiny", "choices": [choice],
            "usage": {"prompt_tokens": 9, "completion_tokens": completion_tokens,
                      "total_tokens": 9 + completion_tokens}}


def accumulate(events: list[bytes]) -> tuple[list[str], Message]:
    """Event types in order, and the message the SDK's stream helper builds from them."""
    snapshot = None
    types = []
    json_bufs: dict[int, bytes] = {}  # the helper's partial tool inputs, per block
    for frame in b"".join(events).decode().split("\n\n"):
        if not frame:
            continue
        name_line, data_line = frame.split("\n")
        payload = json.loads(data_line.removeprefix("data: "))
        assert name_line == f"event: {payload['type']}"
        types.append(payload["type"])
        if payload["type"] != "ping":
            snapshot = accumulate_event(event=payload, current_snapshot=snapshot,
                                       json_bufs=json_bufs)
    assert snapshot is not None
    return types, Message.model_validate(snapshot.to_dict())


def test_stream_events_add_up_to_the_non_streamed_message() -> None:
    chunks = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"reasoning_content": "Need "}, completion_tokens=1),
        chunk({"reasoning_content": "the tool."}, completion_tokens=2),
        chunk({"content": "Check"}, completion_tokens=3),
        chunk({"content": "ing."}, completion_tokens=4),
        chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]},
              completion_tokens=5),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
              completion_tokens=6),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Rome"}'}}]},
              finish="tool_calls", completion_tokens=7),
    ]
    writer = MessageEventWriter("r1")
    events = [event for item in chunks for event in writer.on_chunk(item)] + writer.closing()
    types, streamed = accumulate(events)
    assert types[:2] == ["message_start", "ping"] and types[-2:] == ["message_delta",
                                                                      "message_stop"]
    assert types.count("content_block_start") == types.count("content_block_stop") == 3
    body = {"model": "tiny", "usage": chunks[-1]["usage"], "choices": [{
        "finish_reason": "tool_calls", "stop_reason": None,
        "message": {"role": "assistant", "content": "Checking.",
                    "reasoning_content": "Need the tool.",
                    "tool_calls": [{"id": "call_1", "type": "function", "function": {
                        "name": "get_weather", "arguments": '{"city": "Rome"}'}}]}}]}
    assert streamed == Message.model_validate(message_from_chat(body, "r1"))
    assert streamed.usage.input_tokens == 9


def test_stream_ended_by_a_stop_sequence_and_an_in_stream_error() -> None:
    writer = MessageEventWriter("r3")
    events = writer.on_chunk(chunk({"content": "Hello"}, completion_tokens=1))
    events += writer.on_chunk(chunk({"content": ""}, finish="stop", stop="END",
                                    completion_tokens=2))
    _, message = accumulate(events + writer.closing())
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "END")
    assert [block.text for block in message.content] == ["Hello"]
    (error,) = writer.on_error({"message": "deadline exceeded", "type": "timeout_error",
                                "param": None, "code": None})
    name, data = error.decode().strip().split("\n")
    assert name == "event: error"
    assert json.loads(data.removeprefix("data: ")) == {
        "type": "error", "error": {"type": "timeout_error", "message": "deadline exceeded"}}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    # Nothing listens on this port: a request that got past validation fails with 503.
    settings = BridgeSettings(engine_address=f"127.0.0.1:{reserve_port()}", api_key="k-1")
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def anthropic_error(response: Any, status: int) -> dict[str, str]:
    assert response.status_code == status, response.text
    body = response.json()
    ErrorResponse.model_validate(body)
    return body["error"]


def test_bad_bodies_are_400s_in_anthropic_shape(client: TestClient) -> None:
    headers = {"x-api-key": "k-1"}
    no_max = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}
    error = anthropic_error(client.post("/v1/messages", json=no_max, headers=headers), 400)
    assert error["type"] == "invalid_request_error" and "max_tokens" in error["message"]
    document = {**no_max, "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "text", "data": "x"}}]}]}
    error = anthropic_error(client.post("/v1/messages", json=document, headers=headers), 400)
    assert "messages.0.content" in error["message"] and "'document'" in error["message"]
    unknown_tool = {**no_max, "max_tokens": 5, "tools": [
        {"name": "f", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "tool", "name": "g"}}
    error = anthropic_error(client.post("/v1/messages", json=unknown_tool, headers=headers), 400)
    assert "tool_choice" in error["message"] and "'g'" in error["message"]
    error = anthropic_error(client.post("/v1/messages/count_tokens", json={"model": "tiny"},
                                        headers=headers), 400)
    assert "messages" in error["message"]
    not_utf8 = client.post("/v1/messages", content=b"\x8f\xff{", headers={
        **headers, "content-type": "application/json"})
    assert "UTF-8" in anthropic_error(not_utf8, 400)["message"]


def test_x_api_key_and_bearer_both_authorize(client: TestClient) -> None:
    body = {"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]}
    error = anthropic_error(client.post("/v1/messages", json=body), 401)
    assert error["type"] == "authentication_error"
    anthropic_error(client.post("/v1/messages", json=body, headers={"x-api-key": "nope"}), 401)
    # Past the key check, the unreachable engine answers: 503 in Anthropic's shape.
    for headers in ({"x-api-key": "k-1"}, {"authorization": "Bearer k-1"}):
        error = anthropic_error(client.post("/v1/messages", json=body, headers=headers), 503)
        assert error["type"] == "overloaded_error"
    # The SDK reads these as its own error classes.
    sdk = anthropic.Anthropic(base_url=str(client.base_url), api_key="nope",
                              http_client=client, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        sdk.messages.create(model="tiny", max_tokens=5,
                            messages=[{"role": "user", "content": "Hi"}])
