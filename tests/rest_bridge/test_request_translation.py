"""OpenAI bodies -> GenerateRequest: every field lands in its proto field, with presence."""
from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format
from pydantic import ValidationError

from protoserve.v1 import inference_pb2
from rest_bridge.chat_options import ChatOptions
from rest_bridge.errors import BridgeError
from rest_bridge.openai_schemas.chat import ChatCompletionRequest
from rest_bridge.openai_schemas.completion import CompletionRequest
from rest_bridge.translate.request_to_proto import chat_to_plan, completion_to_plan


def completion(
    body: dict[str, Any], request_id: str = "rid"
) -> list[inference_pb2.GenerateRequest]:
    return list(completion_to_plan(CompletionRequest.model_validate(body), request_id).requests)


def chat(body: dict[str, Any], request_id: str = "rid") -> inference_pb2.GenerateRequest:
    (request,) = chat_to_plan(ChatCompletionRequest.model_validate(body), request_id).requests
    return request


USER_HI = [{"role": "user", "content": "hi"}]


def test_minimal_completion_sets_only_openai_defaults_that_differ_from_the_engine() -> None:
    (request,) = completion({"model": "m", "prompt": "hello"})
    assert request.model == "m"
    assert request.text == "hello"
    assert request.request_id == "rid"
    sampling = request.sampling
    assert sampling.HasField("max_tokens") and sampling.max_tokens == 16
    for name in ("temperature", "top_p", "top_k", "n", "seed", "min_tokens", "logprobs",
                 "ignore_eos", "skip_special_tokens", "best_of", "prompt_logprobs"):
        assert not sampling.HasField(name), name
    assert list(sampling.stop) == [] and dict(sampling.logit_bias) == {}
    assert not request.HasField("constraint")
    assert not request.HasField("add_special_tokens")
    assert request.priority == 0 and request.cache_salt == ""


def test_completion_max_tokens_explicit_null_means_rest_of_context() -> None:
    (request,) = completion({"prompt": "x", "max_tokens": None})
    assert not request.sampling.HasField("max_tokens")
    (request,) = completion({"prompt": "x", "max_tokens": 0})
    assert request.sampling.HasField("max_tokens") and request.sampling.max_tokens == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("temperature", 0.0),
        ("top_p", 0.5),
        ("top_k", -1),
        ("min_p", 0.25),
        ("presence_penalty", -1.5),
        ("frequency_penalty", 1.5),
        ("repetition_penalty", 1.25),
        ("seed", -(2**62)),
        ("min_tokens", 3),
        ("include_stop_str_in_output", True),
        ("ignore_eos", False),
        ("n", 3),
        ("best_of", 4),
        ("prompt_logprobs", 2),
        ("skip_special_tokens", False),
        ("spaces_between_special_tokens", False),
        ("truncate_prompt_tokens", 7),
        ("use_beam_search", False),
        ("length_penalty", 0.75),
    ],
)
def test_each_sampling_field_is_forwarded_with_presence(name: str, value: Any) -> None:
    for body in ({"prompt": "x", name: value}, {"messages": USER_HI, name: value}):
        request = completion(body)[0] if "prompt" in body else chat(body)
        assert request.sampling.HasField(name), name
        assert getattr(request.sampling, name) == pytest.approx(value)


def test_repeated_fields_and_stop_forms() -> None:
    (request,) = completion({
        "prompt": "x", "stop": "END", "stop_token_ids": [5, 6], "allowed_token_ids": [1, 2],
        "bad_words": ["bad"], "logit_bias": {"17": -100, "3": 2.5},
    })
    assert list(request.sampling.stop) == ["END"]
    assert list(request.sampling.stop_token_ids) == [5, 6]
    assert list(request.sampling.allowed_token_ids) == [1, 2]
    assert list(request.sampling.bad_words) == ["bad"]
    assert dict(request.sampling.logit_bias) == {17: -100.0, 3: 2.5}
    (request,) = completion({"prompt": "x", "stop": ["a", "b"]})
    assert list(request.sampling.stop) == ["a", "b"]


def test_logit_bias_key_that_is_not_a_token_id_is_refused() -> None:
    with pytest.raises(BridgeError) as caught:
        completion({"prompt": "x", "logit_bias": {"hello": 1.0}})
    assert caught.value.http_status == 400 and caught.value.param == "logit_bias"


def test_request_level_fields_are_forwarded() -> None:
    (request,) = completion({"prompt": "x", "priority": -3, "cache_salt": "tenant-a",
                             "add_special_tokens": False})
    assert request.priority == -3
    assert request.cache_salt == "tenant-a"
    assert request.HasField("add_special_tokens") and request.add_special_tokens is False


def test_prompt_forms_fan_out_one_call_per_prompt() -> None:
    texts = completion({"prompt": ["a", "b"]}, request_id="r")
    assert [r.text for r in texts] == ["a", "b"]
    assert [r.request_id for r in texts] == ["r-0", "r-1"]
    (ids,) = completion({"prompt": [1, 2, 3]})
    assert ids.WhichOneof("input") == "token_ids" and list(ids.token_ids.ids) == [1, 2, 3]
    batches = completion({"prompt": [[1], [2, 3]]})
    assert [list(r.token_ids.ids) for r in batches] == [[1], [2, 3]]
    # An empty prompt in any form is refused by the schema (so /openapi.json says so).
    for empty in ("", [], [""], [[]]):
        with pytest.raises(ValidationError):
            completion({"prompt": empty})


def test_bridge_only_rules() -> None:
    with pytest.raises(BridgeError) as caught:
        completion({"prompt": "x", "suffix": "tail"})
    assert caught.value.param == "suffix"
    for body in ({"prompt": "x", "stream_options": {"include_usage": True}},
                 {"messages": USER_HI, "stream": False, "stream_options": {}}):
        with pytest.raises(BridgeError) as caught:
            completion(body) if "prompt" in body else chat(body)
        assert caught.value.param == "stream_options"


def test_streaming_best_of_is_refused_except_as_a_beam_width() -> None:
    with pytest.raises(BridgeError) as caught:
        completion({"prompt": "x", "stream": True, "n": 2, "best_of": 4})
    assert caught.value.param == "best_of"
    # Beam search sends every choice at the end: nothing to hold back, so it may stream.
    (request,) = completion({"prompt": "x", "stream": True, "n": 2, "best_of": 4,
                             "use_beam_search": True})
    assert request.sampling.use_beam_search and request.sampling.best_of == 4


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"guided_json": {"type": "object"}}, {"jsonSchema": '{"type": "object"}'}),
        ({"guided_json": '{"type": "string"}'}, {"jsonSchema": '{"type": "string"}'}),
        ({"guided_regex": "[a-z]+"}, {"regex": "[a-z]+"}),
        ({"guided_choice": ["yes", "no"]}, {"choice": {"choices": ["yes", "no"]}}),
        ({"guided_grammar": "start: x"}, {"grammar": "start: x"}),
        ({"response_format": {"type": "json_object"}}, {"jsonObject": True}),
        (
            {"response_format": {"type": "json_schema",
                                 "json_schema": {"name": "n", "schema": {"type": "integer"}}}},
            {"jsonSchema": '{"type": "integer"}'},
        ),
        (
            {"guided_regex": "x", "guided_whitespace_pattern": " ", "guided_decoding_backend": "b"},
            {"regex": "x", "whitespacePattern": " ", "backend": "b"},
        ),
    ],
)
def test_guided_decoding_becomes_one_constraint(
    extra: dict[str, Any], expected: dict[str, Any]
) -> None:
    (request,) = completion({"prompt": "x", **extra})
    assert json_format.MessageToDict(request.constraint) == expected


def test_response_format_text_is_no_constraint_and_two_kinds_are_refused() -> None:
    (request,) = completion({"prompt": "x", "response_format": {"type": "text"}})
    assert not request.HasField("constraint")
    with pytest.raises(BridgeError) as caught:
        completion({"prompt": "x", "guided_regex": "a", "guided_choice": ["b"]})
    assert caught.value.param == "guided_choice"
    with pytest.raises(BridgeError) as caught:
        completion({"prompt": "x", "response_format": {"type": "json_schema"}})
    assert caught.value.param == "response_format.json_schema"


def chat_with_options(options: ChatOptions, body: dict[str, Any]) -> inference_pb2.GenerateRequest:
    (request,) = chat_to_plan(ChatCompletionRequest.model_validate(body), "r", options).requests
    return request


def test_chat_messages_become_chat_input() -> None:
    # http(s) media URLs pass only for hosts the server allows.
    options = ChatOptions(allowed_media_domains=("i",))
    request = chat_with_options(options, {
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "name": "ann", "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "http://i/1.png", "detail": "low"}},
                {"image_url": "http://i/2.png"},
                {"type": "input_audio", "input_audio": {"data": "AAA=", "format": "wav"}},
            ]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call1", "type": "function",
                 "function": {"name": "f", "arguments": {"a": 1}}}]},
            {"role": "tool", "tool_call_id": "call1", "content": "42"},
            {"role": "narrator", "content": []},
        ],
    })
    assert request.WhichOneof("input") == "chat" and request.model == "m"
    system, user, assistant, tool, narrator = request.chat.messages
    assert (system.role, system.text) == ("system", "be brief")
    assert user.name == "ann"
    kinds = [part.WhichOneof("part") for part in user.parts.parts]
    assert kinds == ["text", "image_url", "image_url", "input_audio"]
    assert user.parts.parts[1].image_url.detail == "low"
    assert user.parts.parts[2].image_url.url == "http://i/2.png"
    assert user.parts.parts[3].input_audio.format == "wav"
    assert assistant.WhichOneof("content") is None
    assert assistant.tool_calls[0].function.arguments == '{"a": 1}'
    assert (tool.tool_call_id, tool.text) == ("call1", "42")
    assert not tool.HasField("name")
    assert narrator.WhichOneof("content") == "parts" and len(narrator.parts.parts) == 0


def test_chat_template_options_with_presence() -> None:
    request = chat({"messages": USER_HI})
    assert not request.chat.HasField("add_generation_prompt")
    assert not request.chat.HasField("chat_template")
    assert not request.HasField("add_special_tokens")
    request = chat({
        "messages": USER_HI, "add_generation_prompt": False, "continue_final_message": True,
        "chat_template": "{{ messages }}", "chat_template_kwargs": {"enable_thinking": False},
        "documents": [{"title": "t", "text": "body"}],
        "tools": [{"type": "function",
                   "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "add_special_tokens": True,
    })
    options = request.chat
    assert options.HasField("add_generation_prompt") and not options.add_generation_prompt
    assert options.continue_final_message and options.chat_template == "{{ messages }}"
    assert json_format.MessageToDict(options.chat_template_kwargs) == {"enable_thinking": False}
    assert json_format.MessageToDict(options.documents[0]) == {"title": "t", "text": "body"}
    assert json_format.MessageToDict(options.tools[0]) == {
        "type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert options.tool_choice == "f"
    assert request.add_special_tokens is True
    assert chat({"messages": USER_HI, "tool_choice": "auto"}).chat.tool_choice == "auto"


def test_chat_max_tokens_and_logprobs_spelling() -> None:
    plan = chat_to_plan(ChatCompletionRequest.model_validate(
        {"messages": USER_HI, "max_tokens": 5, "max_completion_tokens": 7,
         "logprobs": True, "top_logprobs": 3}), "r")
    (request,) = plan.requests
    assert request.sampling.max_tokens == 7 and request.sampling.logprobs == 3
    assert plan.field_aliases == {"max_tokens": "max_completion_tokens", "logprobs": "top_logprobs"}
    assert chat({"messages": USER_HI, "max_tokens": 5}).sampling.max_tokens == 5
    assert not chat({"messages": USER_HI}).sampling.HasField("max_tokens")
    assert chat({"messages": USER_HI, "logprobs": True}).sampling.logprobs == 0
    assert not chat({"messages": USER_HI, "logprobs": False}).sampling.HasField("logprobs")
    with pytest.raises(BridgeError) as caught:
        chat({"messages": USER_HI, "top_logprobs": 2})
    assert caught.value.param == "top_logprobs"
    # max_completion_tokens wins, but a max_tokens the document refuses is still refused.
    with pytest.raises(BridgeError) as caught:
        chat({"messages": USER_HI, "max_tokens": 0, "max_completion_tokens": 1})
    assert caught.value.param == "max_tokens"


def test_unsupported_content_part_names_its_path() -> None:
    with pytest.raises(BridgeError) as caught:
        chat({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "video_url", "video_url": {"url": "v"}}]}]})
    assert caught.value.param == "messages.0.content.1.type"
    with pytest.raises(BridgeError) as caught:
        chat({"messages": [{"role": "user", "content": [{"type": "text"}]}]})
    assert caught.value.param == "messages.0.content.0"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "max_tokens": 2**31}, "max_tokens"),
        ({"prompt": "x", "seed": 2**63}, "seed"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [2**31]}, "prompt"),
        ({"prompt": "x", "n": True}, "n"),
    ],
)
def test_wrong_json_types_fail_validation_naming_the_field(
    body: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        CompletionRequest.model_validate(body)
    assert caught.value.errors()[0]["loc"][0] == field


def test_unknown_fields_are_kept_not_rejected() -> None:
    body = CompletionRequest.model_validate({"prompt": "x", "store": True, "metadata": {"a": 1}})
    assert body.model_extra == {"store": True, "metadata": {"a": 1}}
    body = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x", "reasoning": "r"}], "modalities": ["text"]})
    assert set(body.model_extra or {}) == {"modalities"}


def test_chat_requests_name_the_bridges_parsers() -> None:
    """The engine reads reasoning and tool calls; the bridge only names its parsers, always
    (none included), and passes parallel_tool_calls on."""
    from rest_bridge.translate.tool_choice import tool_plan_from

    options = ChatOptions(enable_auto_tool_choice=True, tool_call_parser="pythonic",
                          reasoning_parser="qwen3")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    body = ChatCompletionRequest.model_validate(
        {"messages": USER_HI, "tools": tools, "parallel_tool_calls": False})
    (request,) = chat_to_plan(body, "rid", options, tool_plan_from(body, options)).requests
    assert request.parsing.reasoning_parser == "qwen3"
    assert request.parsing.tool_parser == "pythonic"
    assert request.parsing.HasField("parallel_tool_calls")
    assert not request.parsing.parallel_tool_calls
    # tool_choice "none" reads no calls; the reasoning parser still applies.
    body = ChatCompletionRequest.model_validate(
        {"messages": USER_HI, "tools": tools, "tool_choice": "none"})
    (request,) = chat_to_plan(body, "rid", options, tool_plan_from(body, options)).requests
    assert (request.parsing.reasoning_parser, request.parsing.tool_parser) == ("qwen3", "")
    body = ChatCompletionRequest.model_validate({"messages": USER_HI})
    (request,) = chat_to_plan(body, "rid", ChatOptions(), tool_plan_from(body, ChatOptions())).requests
    assert request.HasField("parsing") and request.parsing.reasoning_parser == ""
