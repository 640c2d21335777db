"""/v1/responses and /v1/messages state in /openapi.json what their translation enforces: the
sampling ranges are the chat routes' (the engine's, see test_openapi_engine_rules.py), and each
rule stated beside them refuses in the schema exactly the bodies translation refuses. The fuzz
hooks' edits keep schema-valid bodies schema-valid and servable."""
from __future__ import annotations

from typing import Any

import jsonschema
import pytest
from openapi_fuzz_surfaces import within_messages_rules, within_responses_rules
from pydantic import BaseModel

from rest_bridge.anthropic.schemas import MessagesRequest
from rest_bridge.anthropic.to_chat import chat_request_from
from rest_bridge.errors import BridgeError
from rest_bridge.openai_schemas.completion import CompletionRequest
from rest_bridge.responses.schemas import ResponsesRequest
from rest_bridge.responses.translate import chat_request_of, input_messages

REASONING = {"type": "reasoning", "summary": []}
USER = {"role": "user", "content": "Hi"}


def _member(model: type[BaseModel], name: str) -> dict[str, Any]:
    field = model.model_json_schema()["properties"][name]
    return next(member for member in field["anyOf"] if member.get("type") != "null")


@pytest.mark.parametrize(("model", "name"), [
    (ResponsesRequest, name) for name in
    ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_output_tokens")
] + [(MessagesRequest, name) for name in ("temperature", "top_p", "top_k")])
def test_sampling_ranges_are_the_chat_routes(model: type[BaseModel], name: str) -> None:
    chat_name = "max_tokens" if name == "max_output_tokens" else name
    assert _member(model, name) == _member(CompletionRequest, chat_name)


def _schema_accepts(model: type[BaseModel], body: dict[str, Any]) -> bool:
    return jsonschema.Draft202012Validator(model.model_json_schema()).is_valid(body)


def _responses_translates(body: dict[str, Any]) -> bool:
    try:
        request = ResponsesRequest.model_validate(body)
        chat_request_of(request, input_messages(request))
    except BridgeError:
        return False
    return True


def _messages_translates(body: dict[str, Any]) -> bool:
    try:
        chat_request_from(MessagesRequest.model_validate(body))
    except BridgeError:
        return False
    return True


@pytest.mark.parametrize(("body", "served"), [
    ({"input": [REASONING]}, False),
    ({"input": [REASONING], "instructions": "Be brief."}, True),
    ({"input": [REASONING], "instructions": ""}, False),
    ({"input": [REASONING, USER]}, True),
    ({"input": "Hi", "background": True}, False),
    ({"input": "Hi", "background": False}, True),
    ({"input": "Hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, False),
    ({"input": "Hi", "text": {"format": {"type": "json_schema", "schema": {}}}}, True),
])
def test_responses_schema_refuses_what_translation_refuses(body: dict[str, Any],
                                                           served: bool) -> None:
    assert _responses_translates(body) is served
    assert _schema_accepts(ResponsesRequest, body) is served


def _messages(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 4, "messages": list(messages)}


TOOL_USE = {"type": "tool_use", "id": "t1", "name": "f", "input": {}}
TOOL_RESULT = {"type": "tool_result", "tool_use_id": "t1", "content": "ok"}


def _image(**source: Any) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image", "source": source}]}


@pytest.mark.parametrize(("body", "served"), [
    (_messages({"role": "user", "content": [TOOL_USE]}), False),
    (_messages({"role": "user", "content": [{"type": "thinking", "thinking": "h"}]}), False),
    (_messages(USER, {"role": "assistant", "content": [TOOL_USE]},
               {"role": "user", "content": [TOOL_RESULT]}), True),
    (_messages(USER, {"role": "assistant", "content": [TOOL_RESULT]}), False),
    (_messages(_image(type="base64", media_type="image/png")), False),
    (_messages(_image(type="base64", media_type="image/png", data="")), False),
    (_messages(_image(type="base64", media_type="image/png", data="iVBORw0KGgo=")), True),
    (_messages(_image(type="url")), False),
    (_messages(_image(type="url", url="https://example.com/a.png")), True),
])
def test_messages_schema_refuses_what_translation_refuses(body: dict[str, Any],
                                                          served: bool) -> None:
    assert _messages_translates(body) is served
    assert _schema_accepts(MessagesRequest, body) is served


def test_hooks_keep_a_responses_body_valid_and_its_conversation() -> None:
    body = {"input": [REASONING] * 6 + [{"type": "function_call_output", "call_id": "c",
                                         "output": [{"type": "input_text", "text": "x" * 99}] * 9},
                                        {**USER, "content": [{"type": "input_image",
                                                              "image_url": "https://a/b.png"}]}],
            "max_output_tokens": 9999, "tool_choice": "auto",
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "nonsense"}}],
            "text": {"format": {"type": "json_schema", "schema": {"type": "nonsense"}}}}
    assert _schema_accepts(ResponsesRequest, body)
    within_responses_rules(body)
    assert _schema_accepts(ResponsesRequest, body)
    assert _responses_translates(body)
    assert body["max_output_tokens"] == 4 and "tool_choice" not in body
    assert sum(item.get("type") != "reasoning" for item in body["input"]) == 1


def test_hooks_keep_a_messages_body_valid() -> None:
    body = {**_messages(*[{"role": "user", "content": [
                {"type": "text", "text": "y" * 99},
                {"type": "image", "source": {"type": "url", "url": "https://a/b.png"}}]}] * 9),
            "max_tokens": 2**31 - 1, "tools": [{"name": "f", "input_schema": {"type": "no"}}],
            "tool_choice": {"type": "tool", "name": "g"},
            "output_config": {"format": {"type": "json_schema", "schema": {"type": "no"}}}}
    within_messages_rules(body)
    assert _schema_accepts(MessagesRequest, body)
    chat = chat_request_from(MessagesRequest.model_validate(body)).request
    assert chat.max_tokens == 4 and chat.tool_choice is None and len(chat.messages) == 4
    assert all(part.type == "text" for message in chat.messages for part in message.content)
