"""The official anthropic SDK against the real engine-serve (tiny model): /v1/messages answers
what /v1/chat/completions answers for the same conversation (greedy), streamed through the
SDK's helper and not, with system prompts, stop sequences, a forced tool call and its result
sent back; gRPC Generate of the same conversation agrees; count_tokens counts the prompt the
chat template renders; bad input is the SDK's BadRequestError; a reasoning parser's
reasoning_content is a thinking block."""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anthropic
import grpc
import httpx
import jsonschema
import openai
import pytest
from engine_process import EngineProcess
from served_engine import RunningServer

from protoserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

SYSTEM = "You are a terse assistant."
QUESTION = "Tell me a story about a lighthouse."
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
WEATHER_TOOL = {"name": "get_weather", "description": "Weather for a city",
                "input_schema": WEATHER_SCHEMA}
# This SDK's create() no longer takes sampling parameters (Anthropic's newest models fix them);
# older clients send them in the body, and the server still honours them there.
GREEDY: dict[str, Any] = {"extra_body": {"temperature": 0}}
OPENAI_WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city", "parameters": WEATHER_SCHEMA}}


@pytest.fixture(scope="module")
def claude(served_model: RunningServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=served_model.base_url, api_key="unused",
                               max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def chat(served_model: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served_model.base_url}/v1", api_key="unused",
                         max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_id(chat: openai.OpenAI) -> str:
    return chat.models.list().data[0].id


def blocks(message: anthropic.types.Message) -> list[dict[str, object]]:
    """The content blocks as JSON (the stream helper's blocks add a parsed_output field)."""
    return [{key: value for key, value in block.to_dict().items() if key != "parsed_output"}
            for block in message.content]


def text_of(message: anthropic.types.Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def test_create_and_stream_answer_what_chat_completions_answers(
    claude: anthropic.Anthropic, chat: openai.OpenAI, model_id: str
) -> None:
    message = claude.messages.create(
        model=model_id, max_tokens=24, system=SYSTEM,
        messages=[{"role": "user", "content": QUESTION}], **GREEDY)
    reference = chat.chat.completions.create(
        model=model_id, max_tokens=24, temperature=0,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}])
    choice = reference.choices[0]
    assert message.type == "message" and message.role == "assistant"
    assert message.model == reference.model and message.id.startswith("msg_")
    assert text_of(message) == choice.message.content and message.content
    assert message.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[
        choice.finish_reason]
    assert reference.usage is not None
    assert message.usage.input_tokens == reference.usage.prompt_tokens
    assert message.usage.output_tokens == reference.usage.completion_tokens

    # System as text blocks, streamed through the SDK's helper: the same message.
    with claude.messages.stream(
        model=model_id, max_tokens=24, system=[{"type": "text", "text": SYSTEM}],
        messages=[{"role": "user", "content": QUESTION}], **GREEDY,
    ) as stream:
        streamed_text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed_text == text_of(message)
    assert blocks(final) == blocks(message) and final.usage == message.usage
    assert (final.stop_reason, final.stop_sequence) == (message.stop_reason, None)


def test_grpc_generate_of_the_same_conversation_gives_the_same_message(
    claude: anthropic.Anthropic, served_model: RunningServer, model_id: str
) -> None:
    message = claude.messages.create(
        model=model_id, max_tokens=12, system=SYSTEM,
        messages=[{"role": "user", "content": QUESTION}], **GREEDY)
    request = inference_pb2.GenerateRequest(
        model=model_id,
        chat=common_pb2.ChatInput(messages=[
            common_pb2.ChatMessage(role="system", text=SYSTEM),
            common_pb2.ChatMessage(role="user", text=QUESTION)]),
        sampling=common_pb2.SamplingParams(max_tokens=12, temperature=0.0))
    with grpc.insecure_channel(f"127.0.0.1:{served_model.grpc_port}") as channel:
        events = list(inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60))
    text = "".join(event.delta.text for event in events if event.WhichOneof("event") == "delta")
    (usage,) = [event.usage for event in events if event.WhichOneof("event") == "usage"]
    (finished,) = [event.finished for event in events if event.WhichOneof("event") == "finished"]
    assert text_of(message) == text
    assert (message.usage.input_tokens, message.usage.output_tokens) == (
        usage.prompt_tokens, usage.completion_tokens)
    assert message.stop_reason == {
        inference_pb2.FINISH_REASON_LENGTH: "max_tokens",
        inference_pb2.FINISH_REASON_STOP: "end_turn"}[finished.reason]


def test_stop_sequences_end_the_message_where_chat_stops(
    claude: anthropic.Anthropic, chat: openai.OpenAI, model_id: str
) -> None:
    args: dict[str, Any] = {"model": model_id, "max_tokens": 24,
                            "messages": [{"role": "user", "content": QUESTION}]}
    full = text_of(claude.messages.create(**args, **GREEDY))
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), f"pick a visible stop sequence out of {full!r}"
    message = claude.messages.create(**args, stop_sequences=[stop], **GREEDY)
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", stop)
    assert text_of(message) == full[:full.index(stop)]
    reference = chat.chat.completions.create(**args, stop=[stop], temperature=0)
    assert text_of(message) == reference.choices[0].message.content
    with claude.messages.stream(**args, stop_sequences=[stop], **GREEDY) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)
    assert blocks(final) == blocks(message)


def test_forced_tool_use_round_trip(
    claude: anthropic.Anthropic, chat: openai.OpenAI, model_id: str
) -> None:
    question = {"role": "user", "content": "Weather in Paris for 2 days?"}
    args: dict[str, Any] = {
        "model": model_id, "max_tokens": 120, "messages": [question], "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "tool", "name": "get_weather"}, **GREEDY}
    message = claude.messages.create(**args)
    assert message.stop_reason == "tool_use"
    (call,) = [block for block in message.content if block.type == "tool_use"]
    assert call.name == "get_weather" and call.id
    jsonschema.validate(call.input, WEATHER_SCHEMA)
    # The OpenAI route, forced the same way, calls with the same arguments.
    reference = chat.chat.completions.create(
        model=model_id, max_tokens=120, temperature=0, messages=[question],
        tools=[OPENAI_WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (reference_call,) = reference.choices[0].message.tool_calls or []
    assert json.loads(reference_call.function.arguments) == call.input
    # Streamed: input_json_delta events add up to the same input.
    with claude.messages.stream(**args) as stream:
        final = stream.get_final_message()
    (streamed_call,) = [block for block in final.content if block.type == "tool_use"]
    assert (streamed_call.name, streamed_call.input) == (call.name, call.input)
    assert final.stop_reason == "tool_use"

    # The result goes back as a tool_result block; the answer equals the chat route's answer
    # to the same conversation in OpenAI's form.
    answer = claude.messages.create(
        model=model_id, max_tokens=16, tools=[WEATHER_TOOL], **GREEDY,
        messages=[question, {"role": "assistant", "content": message.content},
                  {"role": "user", "content": [
                      {"type": "tool_result", "tool_use_id": call.id, "content": "18C, sunny"}]}])
    reference_answer = chat.chat.completions.create(
        model=model_id, max_tokens=16, temperature=0, tools=[OPENAI_WEATHER_TOOL],
        messages=[question,
                  {"role": "assistant", "content": "", "tool_calls": [{
                      "id": call.id, "type": "function", "function": {
                          "name": "get_weather",
                          "arguments": json.dumps(call.input, ensure_ascii=False)}}]},
                  {"role": "tool", "tool_call_id": call.id, "content": "18C, sunny"}])
    assert text_of(answer) == reference_answer.choices[0].message.content
    assert reference_answer.usage is not None
    assert answer.usage.input_tokens == reference_answer.usage.prompt_tokens


def test_output_config_format_holds_the_text_to_the_schema(
    claude: anthropic.Anthropic, model_id: str
) -> None:
    message = claude.messages.create(
        model=model_id, max_tokens=120, messages=[{"role": "user", "content": QUESTION}],
        output_config={"format": {"type": "json_schema", "schema": WEATHER_SCHEMA}}, **GREEDY)
    assert message.stop_reason == "end_turn"
    jsonschema.validate(json.loads(text_of(message)), WEATHER_SCHEMA)


def test_count_tokens_is_the_rendered_prompt(
    claude: anthropic.Anthropic, served_model: RunningServer, model_id: str
) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    counted = claude.messages.count_tokens(model=model_id, system=SYSTEM, messages=messages)
    tokenized = httpx.post(f"{served_model.base_url}/tokenize", timeout=30, json={
        "model": model_id,
        "messages": [{"role": "system", "content": SYSTEM}, *messages]}).json()
    assert counted.input_tokens == tokenized["count"] > 0
    created = claude.messages.create(model=model_id, max_tokens=1, system=SYSTEM,
                                     messages=messages, **GREEDY)
    assert created.usage.input_tokens == counted.input_tokens
    # Tools reach the template, so they count (and are counted as the tokenizer renders them).
    with_tools = claude.messages.count_tokens(model=model_id, messages=messages,
                                              tools=[WEATHER_TOOL])
    tokenized = httpx.post(f"{served_model.base_url}/tokenize", timeout=30, json={
        "model": model_id, "messages": messages, "tools": [OPENAI_WEATHER_TOOL]}).json()
    assert with_tools.input_tokens == tokenized["count"]


def test_bad_input_is_a_bad_request_in_anthropic_shape(
    claude: anthropic.Anthropic, served_model: RunningServer, model_id: str
) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    # The engine's own range check, answered in Anthropic's shape.
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude.messages.create(model=model_id, max_tokens=0, messages=messages)
    assert refused.value.status_code == 400
    assert refused.value.body == {"type": "error", "error": {  # the whole Anthropic shape
        "type": "invalid_request_error", "message": refused.value.body["error"]["message"]}}
    assert "max_tokens" in refused.value.message
    with pytest.raises(anthropic.BadRequestError, match="temperature"):
        claude.messages.create(model=model_id, max_tokens=4, messages=messages,
                               extra_body={"temperature": -1})
    # The SDK will not send a request without max_tokens; raw HTTP does.
    response = httpx.post(f"{served_model.base_url}/v1/messages", timeout=30,
                          json={"model": model_id, "messages": messages})
    assert response.status_code == 400
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]


@pytest.fixture(scope="module")
def reasoning_server(shared_server: Callable[..., EngineProcess]) -> str:
    # deepseek_r1's template opens the think block itself: output before </think> is
    # reasoning, so a random model that never closes it answers with reasoning only.
    server = shared_server("--reasoning-parser", "deepseek_r1", role="all")
    assert server.http_url is not None
    return server.http_url


def test_reasoning_content_is_a_thinking_block(reasoning_server: str, model_id: str) -> None:
    claude = anthropic.Anthropic(base_url=reasoning_server, api_key="unused", max_retries=0,
                                 timeout=60)
    chat = openai.OpenAI(base_url=f"{reasoning_server}/v1", api_key="unused", max_retries=0,
                         timeout=60)
    messages = [{"role": "user", "content": "Think about it"}]
    message = claude.messages.create(model=model_id, max_tokens=8, messages=messages, **GREEDY)
    reference = chat.chat.completions.create(model=model_id, max_tokens=8, temperature=0,
                                             messages=messages)
    reasoning = (reference.choices[0].message.model_extra or {})["reasoning_content"]
    assert reasoning and not reference.choices[0].message.content
    (block,) = message.content
    assert block.type == "thinking" and block.thinking == reasoning
    assert message.stop_reason == "max_tokens"
    with claude.messages.stream(model=model_id, max_tokens=8, messages=messages,
                                **GREEDY) as stream:
        thinking_deltas = [event.delta.thinking for event in stream
                           if event.type == "content_block_delta"
                           and event.delta.type == "thinking_delta"]
        final = stream.get_final_message()
    assert "".join(thinking_deltas) == reasoning
    assert blocks(final) == blocks(message)
