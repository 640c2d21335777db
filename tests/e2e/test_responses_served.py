"""/v1/responses through the official `openai` SDK against the real engine-serve (tiny random
Llama): every answer equals the same conversation sent to /v1/chat/completions, because the
route runs the chat pipeline itself."""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import jsonschema
import openai
import pytest
from engine_process import EngineProcess
from openai.types.responses import Response
from served_engine import RunningServer

from protoserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Weather for a city",
                "parameters": WEATHER_PARAMS}
CHAT_WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city", "parameters": WEATHER_PARAMS}}
# Structured output without free whitespace, so a random model still finishes its JSON.
TIGHT_JSON = {"guided_whitespace_pattern": ""}
ANSWER_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                                  "n": {"type": "integer", "maximum": 99}},
                 "required": ["ok", "n"], "additionalProperties": False}
# ChatML that also renders tools, assistant tool calls and tool results (the tiny model's own
# template only knows role and content), so a function call can be sent back as history.
TOOL_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if tools %}<|im_start|>system\n{% for tool in tools %}{{ tool | tojson }}\n"
    "{% endfor %}<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') }}"
    "{%- for call in message['tool_calls'] or [] %}"
    "{{- '<tool_call>' + call['function']['name'] + ' ' + (call['function']['arguments'] "
    "if call['function']['arguments'] is string else call['function']['arguments'] | tojson)"
    " + '</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def tool_client(shared_server: Callable[..., EngineProcess]) -> openai.OpenAI:
    server = shared_server("--chat-template", TOOL_TEMPLATE, role="all")
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="x", max_retries=0,
                         timeout=60)


@pytest.fixture(scope="module")
def client(served_model: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served_model.base_url}/v1", api_key="x", max_retries=0,
                         timeout=60)


@pytest.fixture(scope="module")
def model_id(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def _chat(client: openai.OpenAI, model_id: str, messages: list[dict[str, Any]],
          max_tokens: int, **extra: Any) -> Any:
    return client.chat.completions.create(model=model_id, messages=messages,  # type: ignore
                                          max_completion_tokens=max_tokens, temperature=0,
                                          **extra)


def test_greedy_response_equals_the_chat_completion(client: openai.OpenAI,
                                                    model_id: str) -> None:
    response = client.responses.create(model=model_id, input="Hello there",
                                       instructions="Be brief.", max_output_tokens=12,
                                       temperature=0)
    Response.model_validate(response.to_dict())  # every field the SDK type requires
    chat = _chat(client, model_id, [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Hello there"}], 12)
    assert response.id.startswith("resp_") and response.model == model_id
    assert response.output_text == chat.choices[0].message.content
    assert response.usage is not None
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.usage.total_tokens == chat.usage.total_tokens
    finished = chat.choices[0].finish_reason
    assert response.status == ("incomplete" if finished == "length" else "completed")
    assert response.instructions == "Be brief."


def test_grpc_generate_of_the_same_conversation_gives_the_same_text(
    client: openai.OpenAI, model_id: str, served_model: RunningServer,
) -> None:
    response = client.responses.create(model=model_id, input="Hello there",
                                       instructions="Be brief.", max_output_tokens=12,
                                       temperature=0)
    request = inference_pb2.GenerateRequest(
        model=model_id,
        chat=common_pb2.ChatInput(messages=[common_pb2.ChatMessage(role="system",
                                                                   text="Be brief."),
                                            common_pb2.ChatMessage(role="user",
                                                                   text="Hello there")]),
        sampling=common_pb2.SamplingParams(max_tokens=12, temperature=0.0))
    with grpc.insecure_channel(f"127.0.0.1:{served_model.grpc_port}") as channel:
        events = list(inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60))
    text = "".join(event.delta.text for event in events if event.WhichOneof("event") == "delta")
    (usage,) = [event.usage for event in events if event.WhichOneof("event") == "usage"]
    assert response.output_text == text
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (
        usage.prompt_tokens, usage.completion_tokens)


def test_stream_events_in_order_and_equal_to_the_non_streamed_text(client: openai.OpenAI,
                                                                    model_id: str) -> None:
    args: dict[str, Any] = {"model": model_id, "input": "Once upon a time",
                            "max_output_tokens": 10, "temperature": 0}
    plain = client.responses.create(**args)
    events = list(client.responses.create(**args, stream=True))
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", f"response.{plain.status}"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == plain.output_text
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == plain.output_text and final.usage == plain.usage


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI,
                                                         model_id: str) -> None:
    first = client.responses.create(model=model_id, input="Hello there", max_output_tokens=6,
                                    temperature=0)
    second = client.responses.create(model=model_id, previous_response_id=first.id,
                                     input="And then?", max_output_tokens=6, temperature=0)
    assert second.previous_response_id == first.id
    chat = _chat(client, model_id, [{"role": "user", "content": "Hello there"},
                                    {"role": "assistant", "content": first.output_text},
                                    {"role": "user", "content": "And then?"}], 6)
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens == chat.usage.prompt_tokens > first.usage.input_tokens
    assert second.output_text == chat.choices[0].message.content


def test_function_call_round_trip(tool_client: openai.OpenAI, model_id: str) -> None:
    client = tool_client
    called = client.responses.create(
        model=model_id, input="Weather in Paris?", tools=[WEATHER_TOOL],  # type: ignore
        tool_choice={"type": "function", "name": "get_weather"}, temperature=0,
        max_output_tokens=120, extra_body=TIGHT_JSON)
    (call,) = [item for item in called.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMS)
    answered = client.responses.create(
        model=model_id, previous_response_id=called.id, tools=[WEATHER_TOOL],  # type: ignore
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        max_output_tokens=6, temperature=0)
    # The same turn with the call sent back as an input item, and as chat messages.
    explicit = client.responses.create(
        model=model_id, tools=[WEATHER_TOOL], max_output_tokens=6, temperature=0,  # type: ignore
        input=[{"role": "user", "content": "Weather in Paris?"},
               {"type": "function_call", "call_id": call.call_id, "name": call.name,
                "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    chat = _chat(client, model_id, [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}], 6,
        tools=[CHAT_WEATHER_TOOL])
    assert answered.usage is not None and explicit.usage is not None
    assert answered.usage.input_tokens == explicit.usage.input_tokens == chat.usage.prompt_tokens
    assert answered.output_text == explicit.output_text == chat.choices[0].message.content


def test_forced_call_streams_through_the_sdk_helper(client: openai.OpenAI,
                                                    model_id: str) -> None:
    with client.responses.stream(
        model=model_id, input="Weather in Rome?", tools=[WEATHER_TOOL],  # type: ignore
        tool_choice={"type": "function", "name": "get_weather"}, temperature=0,
        max_output_tokens=120, extra_body=TIGHT_JSON,
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    assert "response.function_call_arguments.done" in kinds
    (call,) = [item for item in final.output if item.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMS)


def test_json_schema_text_format_parses_and_validates(client: openai.OpenAI,
                                                      model_id: str) -> None:
    text = {"format": {"type": "json_schema", "name": "answer", "schema": ANSWER_SCHEMA,
                       "strict": True}}
    plain = client.responses.create(model=model_id, input="Answer in JSON.", text=text,
                                    temperature=0, max_output_tokens=60, extra_body=TIGHT_JSON)
    jsonschema.validate(json.loads(plain.output_text), ANSWER_SCHEMA)
    with client.responses.stream(model=model_id, input="Answer in JSON.", text=text,
                                 temperature=0, max_output_tokens=60,
                                 extra_body=TIGHT_JSON) as stream:
        final = stream.get_final_response()
    assert final.output_text == plain.output_text


def test_retrieve_cancel_delete_and_store_false(client: openai.OpenAI, model_id: str) -> None:
    stored = client.responses.create(model=model_id, input="Hi", max_output_tokens=3,
                                     temperature=0)
    assert client.responses.retrieve(stored.id).to_dict() == stored.to_dict()
    with pytest.raises(openai.BadRequestError, match="Cannot cancel a synchronous response"):
        client.responses.cancel(stored.id)
    client.responses.delete(stored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(stored.id)
    unstored = client.responses.create(model=model_id, input="Hi", max_output_tokens=3,
                                       temperature=0, store=False)
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.retrieve(unstored.id)
    assert unstored.id in missing.value.message
    with pytest.raises(openai.NotFoundError) as no_previous:
        client.responses.create(model=model_id, input="Hi", previous_response_id=unstored.id)
    assert no_previous.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_an_unserved_method_on_a_response_names_both_served_ones(
    served_model: RunningServer,
) -> None:
    answer = httpx.put(f"{served_model.base_url}/v1/responses/resp_x", timeout=30)
    assert answer.status_code == 405
    assert answer.headers["allow"] == "DELETE, GET"
    assert answer.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("extra", "param"), [
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"temperature": "hot"}, "temperature"),
])
def test_bad_input_is_a_400_naming_the_field(client: openai.OpenAI, model_id: str,
                                              extra: dict[str, Any], param: str) -> None:
    args: dict[str, Any] = {"model": model_id, "input": "Hi", **extra}
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(**args)
    assert refused.value.body["param"] == param  # type: ignore[index]
    assert refused.value.body["type"] == "invalid_request_error"  # type: ignore[index]


@pytest.fixture(scope="module")
def reasoning_client(shared_server: Callable[..., EngineProcess]) -> openai.OpenAI:
    # deepseek_r1's template opens the think block itself: output before </think> is
    # reasoning, so a random model that never closes it answers with reasoning only.
    server = shared_server("--reasoning-parser", "deepseek_r1", role="all")
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="x", max_retries=0,
                         timeout=60)


def test_reasoning_content_becomes_a_reasoning_item(reasoning_client: openai.OpenAI,
                                                     model_id: str) -> None:
    client = reasoning_client
    args: dict[str, Any] = {"model": model_id, "input": "Think about it",
                            "max_output_tokens": 8, "temperature": 0}
    response = client.responses.create(**args)
    chat = _chat(client, model_id, [{"role": "user", "content": "Think about it"}], 8)
    reasoning = chat.choices[0].message.model_extra["reasoning_content"]
    assert reasoning and not chat.choices[0].message.content
    (item,) = response.output
    assert item.type == "reasoning" and item.content is not None
    assert item.content[0].text == reasoning and response.output_text == ""
    events = list(client.responses.create(**args, stream=True))
    kinds = [event.type for event in events]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert "response.reasoning_text.done" in kinds
    streamed = "".join(event.delta for event in events
                       if event.type == "response.reasoning_text.delta")
    assert streamed == reasoning
