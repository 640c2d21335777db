"""/v1/responses as a translation onto the chat pipeline (no server): Responses requests
become the chat requests a chat client would send, chat output becomes Responses items and
events that the official `openai` SDK's own types and stream accumulator accept."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from rest_bridge.errors import BridgeError
from rest_bridge.openai_schemas.chat import ChatCompletionRequest
from rest_bridge.responses.draft import ResponseDraft
from rest_bridge.responses.output import OutputBuilder
from rest_bridge.responses.schemas import ResponsesRequest
from rest_bridge.responses.store import ResponseStore
from rest_bridge.responses.stream import responses_events
from rest_bridge.responses.translate import chat_request_of, input_messages, responses_param
from rest_bridge.sse import SSE_DONE, sse_event

EVENT = TypeAdapter(ResponseStreamEvent)
WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string"}},
                  "required": ["city"]}


def chat_of(request: dict[str, Any], history: list[dict[str, Any]] | None = None
            ) -> ChatCompletionRequest:
    body = ResponsesRequest.model_validate(request)
    return chat_request_of(body, [*(history or []), *input_messages(body)])


def test_string_input_with_instructions_is_a_system_and_a_user_message() -> None:
    chat = chat_of({"model": "m", "input": "Hi there", "instructions": "Be brief.",
                    "max_output_tokens": 9, "temperature": 0.0, "top_p": 0.5})
    expected = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Hi there"}],
        "max_completion_tokens": 9, "temperature": 0.0, "top_p": 0.5})
    assert chat == expected


def test_function_call_round_trip_items_are_chat_tool_messages() -> None:
    chat = chat_of({"input": [
        {"role": "developer", "content": "Use tools."},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "Weather "}, {"type": "input_text",
                                                                  "text": "in Paris?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "call_id": "c1", "name": "get_weather",
         "arguments": '{"city":"Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather",
         "arguments": '{"city":"Lyon"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": "rain"},
    ], "tools": [{"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMS}],
        "tool_choice": {"type": "function", "name": "get_weather"}})
    calls = [{"id": cid, "type": "function",
              "function": {"name": "get_weather", "arguments": f'{{"city":"{city}"}}'}}
             for cid, city in (("c1", "Paris"), ("c2", "Lyon"))]
    expected = ChatCompletionRequest.model_validate({
        "messages": [{"role": "system", "content": "Use tools."},
                     {"role": "user", "content": "Weather in Paris?"},
                     {"role": "assistant", "content": None, "tool_calls": calls},
                     {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                     {"role": "tool", "tool_call_id": "c2", "content": "rain"}],
        "tools": [{"type": "function", "function": {"name": "get_weather",
                                                    "parameters": WEATHER_PARAMS}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert chat == expected


def test_text_format_becomes_response_format_and_stream_asks_for_usage() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat = chat_of({"input": "x", "stream": True, "text": {"format": {
        "type": "json_schema", "name": "thing", "schema": schema, "strict": True}}})
    assert chat.response_format is not None
    assert chat.response_format.model_dump(by_alias=True, exclude_none=True) == {
        "type": "json_schema", "json_schema": {"name": "thing", "schema": schema,
                                               "strict": True}}
    assert chat.stream and chat.stream_options is not None and chat.stream_options.include_usage
    assert chat_of({"input": "x", "text": {"format": {"type": "json_object"}}}
                   ).response_format.type == "json_object"  # type: ignore[union-attr]
    assert chat_of({"input": "x", "text": {"format": {"type": "text"}}}).response_format is None


def test_history_comes_between_instructions_and_the_new_input() -> None:
    history = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}]
    chat = chat_of({"input": "three", "instructions": "sys"}, history)
    assert [(m.role, m.content) for m in chat.messages] == [
        ("system", "sys"), ("user", "one"), ("assistant", "two"), ("user", "three")]


@pytest.mark.parametrize(("request_body", "param"), [
    ({"input": [{"type": "message", "role": "user", "content": "a"},
                {"type": "item_reference", "id": "x"}]}, "input[1].type"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input[0].content"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"input": "x", "tool_choice": {"type": "function"}}, "tool_choice.name"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}},
     "text.format.schema"),
    ({"input": "x", "background": True}, "background"),
])
def test_bad_input_names_the_responses_field(request_body: dict[str, Any], param: str) -> None:
    with pytest.raises(BridgeError) as caught:
        chat_of(request_body)
    assert caught.value.http_status == 400
    assert caught.value.param is not None and caught.value.param.startswith(param)
    assert param in caught.value.message or caught.value.param == param


def test_chat_field_names_map_back_to_responses_fields() -> None:
    assert responses_param("max_completion_tokens") == "max_output_tokens"
    assert responses_param("response_format") == "text.format"
    assert responses_param("messages[2].content") == "input"
    assert responses_param("tools[1].function.parameters") == "tools[1].parameters"
    assert responses_param("temperature") == "temperature"
    assert responses_param(None) is None


CHAT_MESSAGE = {"role": "assistant", "reasoning_content": "think first",
                "content": "Calling.",
                "tool_calls": [{"id": "call_a", "type": "function",
                                "function": {"name": "get_weather",
                                             "arguments": '{"city": "Paris"}'}}]}
# The same message as chat stream deltas would carry it.
CHAT_DELTAS = [
    {"role": "assistant", "content": ""},
    {"reasoning_content": "think "}, {"reasoning_content": "first"},
    {"content": "Call"}, {"content": "ing."},
    {"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": '}}]},
    {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
]


def _without_ids(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{key: value for key, value in item.items() if key != "id"} for item in items]


def test_stream_events_add_up_to_the_whole_message_output() -> None:
    whole = OutputBuilder()
    whole.feed_message(CHAT_MESSAGE)
    whole.finish()
    streamed = OutputBuilder()
    events = [event for delta in CHAT_DELTAS for event in streamed.feed_message(delta)]
    events += streamed.finish()
    assert _without_ids(streamed.items) == _without_ids(whole.items)
    assert [item["type"] for item in whole.items] == ["reasoning", "message", "function_call"]
    assert whole.items[2]["call_id"] == "call_a"
    kinds = [event["type"] for event in events]
    assert kinds[:3] == ["response.output_item.added", "response.content_part.added",
                         "response.reasoning_text.delta"]
    assert kinds[-2:] == ["response.function_call_arguments.done",
                          "response.output_item.done"]
    assert "response.output_text.done" in kinds and "response.content_part.done" in kinds


def _draft(request: dict[str, Any]) -> ResponseDraft:
    body = ResponsesRequest.model_validate(request)
    return ResponseDraft(body, "tiny", [], input_messages(body))


async def _chat_frames(chunks: list[dict[str, Any]]) -> AsyncGenerator[bytes, None]:
    for chunk in chunks:
        yield sse_event(chunk)
    yield SSE_DONE


def _run_stream(draft: ResponseDraft, chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    done: list[ResponseDraft] = []

    async def read() -> list[bytes]:
        return [frame async for frame in responses_events(draft, _chat_frames(chunks),
                                                          done.append)]

    frames = asyncio.run(read())
    assert done == [draft]
    events = []
    for frame in frames:
        name, data = frame.decode().removesuffix("\n\n").split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        events.append(event)
    return events


def _chat_chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}]}


def test_stream_is_accepted_by_the_sdk_accumulator() -> None:
    usage = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    chunks = [_chat_chunk(delta) for delta in CHAT_DELTAS]
    chunks.append(_chat_chunk({}, "tool_calls"))
    chunks.append({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                   "model": "m", "choices": [], "usage": usage})
    events = _run_stream(_draft({"input": "hi", "stream": True}), chunks)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created"
    assert events[1]["type"] == "response.in_progress"
    assert events[-1]["type"] == "response.completed"
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
    for raw in events:
        state.handle_event(EVENT.validate_python(raw))
    final = Response.model_validate(events[-1]["response"])
    assert final.status == "completed"
    assert final.output_text == "Calling."
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens,
            final.usage.total_tokens) == (7, 5, 12)
    call = final.output[2]
    assert call.type == "function_call"
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})


def test_length_cut_is_incomplete_and_an_in_stream_error_fails() -> None:
    events = _run_stream(_draft({"input": "hi", "stream": True, "max_output_tokens": 2}),
                         [_chat_chunk({"content": "ab"}, "length")])
    final = Response.model_validate(events[-1]["response"])
    assert events[-1]["type"] == "response.incomplete"
    assert final.status == "incomplete" and final.incomplete_details is not None
    assert final.incomplete_details.reason == "max_output_tokens"
    failing = [_chat_chunk({"content": "a"}),
               {"error": {"message": "engine died", "type": "server_error", "param": None,
                          "code": None}}]
    events = _run_stream(_draft({"input": "hi", "stream": True}), failing)
    assert [event["type"] for event in events[-2:]] == ["error", "response.failed"]
    for raw in events:
        EVENT.validate_python(raw)
    assert events[-1]["response"]["error"]["message"] == "engine died"


def test_non_streamed_response_validates_as_the_sdk_response() -> None:
    draft = _draft({"input": "hi", "instructions": "sys", "metadata": {"k": "v"},
                    "tools": [{"type": "function", "name": "get_weather",
                               "parameters": WEATHER_PARAMS}]})
    draft.output.feed_message(CHAT_MESSAGE)
    draft.output.finish()
    draft.finish("tool_calls", {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                                "prompt_tokens_details": {"cached_tokens": 2}})
    response = Response.model_validate(draft.to_dict())
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.instructions == "sys" and response.metadata == {"k": "v"}
    assert response.usage is not None and response.usage.input_tokens_details.cached_tokens == 2
    assert [item.type for item in response.output] == ["reasoning", "message", "function_call"]
    # The conversation a later turn continues: its input, then this output as chat messages.
    assert draft.conversation() == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Calling.", "tool_calls": [
            {"id": "call_a", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}]


def test_store_drops_the_least_recently_used_and_zero_keeps_none() -> None:
    store = ResponseStore(2)
    for name in ("a", "b"):
        store.put({"id": name}, [])
    assert store.get("a") is not None  # "b" is now the least recently used
    store.put({"id": "c"}, [])
    assert store.get("b") is None and store.get("a") is not None and len(store) == 2
    assert store.delete("a") and not store.delete("a")
    empty = ResponseStore(0)
    empty.put({"id": "a"}, [])
    assert empty.get("a") is None
    with pytest.raises(ValueError, match="--responses-store-size"):
        ResponseStore(-1)


def test_store_size_flag_reaches_the_bridge_from_engine_serve() -> None:
    from protoserve.cli.bridge_child import bridge_args
    from protoserve.cli.serve import build_parser
    from rest_bridge.cli import build_parser as bridge_parser
    from rest_bridge.cli import settings_from_args

    def bridge_store_size(*serve_flags: str) -> int:
        serve = build_parser().parse_args(list(serve_flags))
        argv = ["--engine-address", "127.0.0.1:1", *bridge_args(serve)]
        return settings_from_args(bridge_parser().parse_args(argv)).chat.responses_store_size

    assert bridge_store_size() == 1000
    assert bridge_store_size("--responses-store-size", "0") == 0
