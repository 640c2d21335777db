"""The bridge subprocess over real sockets, in front of the scripted gRPC engine: what reaches
the engine, what the client gets back, errors before and after the first byte, cancellation."""
from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from scripted_engine import FIRST_TOKEN_ID, MODEL_ALIAS, MODEL_ID, ReceivedCall, ScriptedEngine

from rest_bridge.app import create_app
from rest_bridge.chat_options import ChatOptions
from rest_bridge.openai_schemas.responses import (
    ChatCompletionResponse,
    CompletionResponse,
    ModelList,
)
from rest_bridge.settings import BridgeSettings
from rest_bridge.sse import parse_sse_events


def new_id() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def post(bridge_url: str, path: str, body: dict[str, Any], request_id: str) -> httpx.Response:
    return httpx.post(f"{bridge_url}{path}", json=body, headers={"X-Request-Id": request_id},
                      timeout=30)


def calls_for(engine: ScriptedEngine, request_id: str) -> list[ReceivedCall]:
    return [call for call in engine.record.calls_snapshot()
            if call.metadata.get("x-request-id", "").startswith(request_id)]


def wait_for_cancel(engine: ScriptedEngine, request_id: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if request_id in engine.record.cancelled_snapshot():
            return
        time.sleep(0.05)
    raise AssertionError(f"the engine never saw request {request_id} cancelled")


def test_completion_reaches_the_engine_and_comes_back(bridge_url: str,
                                                      scripted_engine: ScriptedEngine) -> None:
    request_id = new_id()
    response = post(bridge_url, "/v1/completions",
                    {"model": MODEL_ID, "prompt": "say it", "max_tokens": 3, "seed": 9}, request_id)
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == request_id
    body = CompletionResponse.model_validate(response.json())
    assert body.id == f"cmpl-{request_id}" and body.model == MODEL_ID
    assert body.choices[0].text == " w0 w1 w2"
    assert body.choices[0].finish_reason == "length"
    # No prompt_tokens_details without --enable-prompt-tokens-details: null in a plain body,
    # as the reference server sends it.
    assert response.json()["usage"] == {
        "prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5,
        "prompt_tokens_details": None}
    (call,) = calls_for(scripted_engine, request_id)
    assert call.metadata["x-request-id"] == request_id
    assert call.request.request_id == request_id and call.request.text == "say it"
    assert call.request.sampling.seed == 9
    assert not call.request.sampling.HasField("temperature")


def test_streamed_text_equals_the_plain_response_and_ends_with_usage(bridge_url: str) -> None:
    body = {"model": MODEL_ID, "prompt": "x", "max_tokens": 4}
    plain = post(bridge_url, "/v1/completions", body, new_id()).json()
    streamed = post(bridge_url, "/v1/completions",
                    {**body, "stream": True, "stream_options": {"include_usage": True}}, new_id())
    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    *chunks, usage_chunk, done = parse_sse_events(streamed.content)
    assert done == "[DONE]"
    # One chunk per token; the last one carries the finish reason (no empty trailing chunk).
    assert [(c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in chunks] == [
        (" w0", None), (" w1", None), (" w2", None), (" w3", "length")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert usage_chunk["choices"] == []
    # Streamed usage leaves prompt_tokens_details out (without the flag), the body has null.
    assert usage_chunk["usage"] == {key: value for key, value in plain["usage"].items()
                                    if key != "prompt_tokens_details"}


def test_batch_prompts_with_n_run_as_parallel_calls(bridge_url: str,
                                                    scripted_engine: ScriptedEngine) -> None:
    request_id = new_id()
    response = post(bridge_url, "/v1/completions",
                    {"prompt": ["a", "b c"], "n": 2, "max_tokens": 2, "temperature": 1.0},
                    request_id)
    choices = response.json()["choices"]
    assert [choice["index"] for choice in choices] == [0, 1, 2, 3]
    assert response.json()["usage"]["prompt_tokens"] == 1 + 2
    calls = calls_for(scripted_engine, request_id)
    assert sorted(call.request.request_id for call in calls) == [f"{request_id}-0",
                                                                 f"{request_id}-1"]
    assert all(call.request.sampling.n == 2 for call in calls)
    stream = post(bridge_url, "/v1/completions",
                  {"prompt": ["a", "b"], "n": 2, "max_tokens": 2, "stream": True}, new_id())
    indices = {c["choices"][0]["index"] for c in parse_sse_events(stream.content)[:-1]}
    assert indices == {0, 1, 2, 3}


def test_a_request_without_model_is_answered_with_the_default_model(bridge_url: str) -> None:
    body = post(bridge_url, "/v1/completions", {"prompt": "x", "max_tokens": 1}, new_id()).json()
    assert body["model"] == MODEL_ID


def test_echo_prepends_the_prompt_text(bridge_url: str) -> None:
    text = post(bridge_url, "/v1/completions", {"prompt": "hi", "echo": True, "max_tokens": 1},
                new_id()).json()["choices"][0]["text"]
    assert text == "hi w0"
    # Token-id prompts echo the engine's rendering of the prompt.
    text = post(bridge_url, "/v1/completions", {"prompt": [5, 6], "echo": True, "max_tokens": 1},
                new_id()).json()["choices"][0]["text"]
    assert text == "<rendered> w0"


def test_completion_and_chat_logprobs_shapes(bridge_url: str) -> None:
    choice = post(bridge_url, "/v1/completions", {"prompt": "x", "max_tokens": 2, "logprobs": 1},
                  new_id()).json()["choices"][0]
    assert choice["logprobs"] == {
        "text_offset": [0, 3], "token_logprobs": [-0.5, -0.5], "tokens": [" w0", " w1"],
        # The chosen token first, then the top alternatives (up to logprobs + 1 entries).
        "top_logprobs": [{" w0": -0.5, " alt0": -0.5}, {" w1": -0.5, " alt0": -0.5}]}
    zero = post(bridge_url, "/v1/completions", {"prompt": "x", "max_tokens": 2, "logprobs": 0},
                new_id()).json()["choices"][0]["logprobs"]
    assert zero["top_logprobs"] == [{" w0": -0.5}, {" w1": -0.5}]
    chat = post(bridge_url, "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1,
                 "logprobs": True, "top_logprobs": 2}, new_id()).json()
    ChatCompletionResponse.model_validate(chat)
    (entry,) = chat["choices"][0]["logprobs"]["content"]
    assert entry["token"] == " w0" and entry["bytes"] == list(b" w0")
    assert [alt["token"] for alt in entry["top_logprobs"]] == [" alt0", " alt1"]


def test_chat_forwards_messages_and_stops_on_a_stop_string(bridge_url: str,
                                                           scripted_engine: ScriptedEngine) -> None:
    request_id = new_id()
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "go"}]
    response = post(bridge_url, "/v1/chat/completions",
                    {"model": MODEL_ALIAS, "messages": messages, "stop": ["w2"],
                     "chat_template_kwargs": {"flag": True}}, request_id)
    body = ChatCompletionResponse.model_validate(response.json())
    # Asked by its alias, the model is reported by its first served name.
    assert body.id == f"chatcmpl-{request_id}" and body.model == MODEL_ID
    assert body.choices[0].message.content == " w0 w1"
    assert (body.choices[0].finish_reason, body.choices[0].stop_reason) == ("stop", "w2")
    (call,) = calls_for(scripted_engine, request_id)
    assert [m.role for m in call.request.chat.messages] == ["system", "user"]
    assert call.request.chat.chat_template_kwargs["flag"] is True


def test_chat_body_request_id_names_the_request_without_a_header(bridge_url: str) -> None:
    request_id = new_id()
    response = httpx.post(f"{bridge_url}/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "x"}], "max_tokens": 1,
        "request_id": request_id})
    assert response.json()["id"] == f"chatcmpl-{request_id}"
    assert response.headers["x-request-id"] == request_id


def test_chat_stream_shape(bridge_url: str) -> None:
    response = post(bridge_url, "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "n": 2,
                     "stream": True}, new_id())
    *chunks, done = parse_sse_events(response.content)
    assert done == "[DONE]"
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [
        {"role": "assistant", "content": ""}] * 2
    finishes = [c for c in chunks if c["choices"][0]["finish_reason"] is not None]
    assert sorted(c["choices"][0]["index"] for c in finishes) == [0, 1]
    assert all(c["choices"][0]["finish_reason"] == "length" for c in finishes)


@pytest.mark.parametrize(
    ("script", "status", "error_type", "param", "code"),
    [
        ("error:INVALID_ARGUMENT:temperature:INVALID_SAMPLING_PARAM", 400,
         "invalid_request_error", "temperature", "INVALID_SAMPLING_PARAM"),
        ("error:NOT_FOUND:model:MODEL_NOT_FOUND", 404, "not_found_error", "model",
         "MODEL_NOT_FOUND"),
        ("error:RESOURCE_EXHAUSTED::QUEUE_FULL", 429, "rate_limit_error", None, "QUEUE_FULL"),
        ("error:UNAVAILABLE::DRAINING", 503, "service_unavailable_error", None, "DRAINING"),
        ("error:UNIMPLEMENTED", 501, "not_implemented_error", None, None),
        ("error:DEADLINE_EXCEEDED", 504, "timeout_error", None, None),
        ("error:UNAUTHENTICATED", 401, "authentication_error", None, None),
        ("error:INTERNAL", 500, "server_error", None, None),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_engine_errors_before_the_first_byte_are_http_errors(
    bridge_url: str, script: str, status: int, error_type: str, param: str | None,
    code: str | None, stream: bool,
) -> None:
    response = post(bridge_url, "/v1/completions", {"prompt": script, "stream": stream}, new_id())
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"error": {"message": f"scripted {script.split(':')[1]}",
                                         "type": error_type, "param": param, "code": code}}


def test_chat_field_errors_use_the_openai_spelling(bridge_url: str) -> None:
    response = post(bridge_url, "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "error:INVALID_ARGUMENT:max_tokens"}],
                     "max_completion_tokens": 5}, new_id())
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "max_completion_tokens"


def test_a_failure_mid_stream_is_an_error_event_then_done(bridge_url: str) -> None:
    response = post(bridge_url, "/v1/completions",
                    {"prompt": "fail-after:2", "stream": True, "max_tokens": 5}, new_id())
    assert response.status_code == 200
    events = parse_sse_events(response.content)
    assert [e["choices"][0]["text"] for e in events[:2]] == [" w0", " w1"]
    assert events[2]["error"]["type"] == "server_error"
    assert events[3:] == ["[DONE]"]
    plain = post(bridge_url, "/v1/completions", {"prompt": "fail-after:1"}, new_id())
    assert plain.status_code == 500 and plain.json()["error"]["message"] == "scripted failure"


def test_closing_a_stream_cancels_the_engine_call(bridge_url: str,
                                                  scripted_engine: ScriptedEngine) -> None:
    request_id = new_id()
    with httpx.stream("POST", f"{bridge_url}/v1/chat/completions", timeout=30,
                      headers={"X-Request-Id": request_id},
                      json={"messages": [{"role": "user", "content": "hang"}],
                            "stream": True}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    wait_for_cancel(scripted_engine, request_id)


def test_a_client_giving_up_on_a_plain_request_cancels_the_engine_call(
    bridge_url: str, scripted_engine: ScriptedEngine
) -> None:
    request_id = new_id()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{bridge_url}/v1/completions", json={"prompt": "hang"},
                   headers={"X-Request-Id": request_id}, timeout=1.0)
    wait_for_cancel(scripted_engine, request_id)


def test_models_health_and_the_openai_sdk(bridge_url: str) -> None:
    models = ModelList.model_validate(httpx.get(f"{bridge_url}/v1/models").json())
    assert [card.id for card in models.data] == [MODEL_ID, MODEL_ALIAS]
    assert models.data[0].max_model_len == 128 and models.data[0].owned_by == "protoserve"
    assert models.data[0].root == "/models/scripted"
    card = httpx.get(f"{bridge_url}/v1/models/{MODEL_ALIAS}").json()
    assert card["id"] == MODEL_ALIAS and card["root"] == "/models/scripted"
    missing = httpx.get(f"{bridge_url}/v1/models/org/none")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    assert httpx.get(f"{bridge_url}/health").status_code == 200
    client = openai.OpenAI(base_url=f"{bridge_url}/v1", api_key="x", max_retries=0)
    assert [model.id for model in client.models.list()] == [MODEL_ID, MODEL_ALIAS]
    assert client.models.retrieve(MODEL_ALIAS).id == MODEL_ALIAS
    completion = client.completions.create(model=MODEL_ID, prompt="x", max_tokens=2)
    assert completion.choices[0].text == " w0 w1"
    chunks = list(client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "x"}], max_tokens=2, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == " w0 w1"
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model=MODEL_ID, prompt="error:NOT_FOUND:model", max_tokens=2)
    assert caught.value.status_code == 404


def test_prompt_tokens_details_only_with_the_flag(bridge_url: str,
                                                  scripted_engine: ScriptedEngine) -> None:
    chat_body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    stream_options = {"stream": True,
                      "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    # Without --enable-prompt-tokens-details (the bridge_url bridge): null in a plain body,
    # left out of streamed usage.
    plain = post(bridge_url, "/v1/chat/completions", chat_body, new_id()).json()
    assert plain["usage"]["prompt_tokens_details"] is None
    streamed = post(bridge_url, "/v1/chat/completions", {**chat_body, **stream_options},
                    new_id())
    chunks = parse_sse_events(streamed.content)[:-1]
    assert chunks and all("prompt_tokens_details" not in c["usage"] for c in chunks)
    # With it: the prefix cache's share of the prompt, everywhere usage goes.
    settings = BridgeSettings(engine_address=f"127.0.0.1:{scripted_engine.port}",
                              chat=ChatOptions(enable_prompt_tokens_details=True))
    details = {"cached_tokens": 1}
    with TestClient(create_app(settings)) as client:
        for path, body in (("/v1/completions", {"prompt": "x", "max_tokens": 2}),
                           ("/v1/chat/completions", chat_body)):
            assert client.post(path, json=body).json()["usage"]["prompt_tokens_details"] == (
                details)
            chunks = parse_sse_events(client.post(path, json={**body, **stream_options}).content)
            assert chunks[-1] == "[DONE]"
            assert all(c["usage"]["prompt_tokens_details"] == details for c in chunks[:-1])


def test_return_tokens_as_token_ids_server_default(scripted_engine: ScriptedEngine) -> None:
    """--return-tokens-as-token-ids: logprob tokens as token_id:N unless a request says
    otherwise, on completions and chat."""
    settings = BridgeSettings(engine_address=f"127.0.0.1:{scripted_engine.port}",
                              chat=ChatOptions(return_tokens_as_token_ids=True))
    first = f"token_id:{FIRST_TOKEN_ID}"
    with TestClient(create_app(settings)) as client:
        completion = client.post("/v1/completions", json={
            "prompt": "x", "max_tokens": 1, "logprobs": 0}).json()["choices"][0]["logprobs"]
        assert completion["tokens"] == [first]
        chat = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 1,
            "logprobs": True}).json()["choices"][0]["logprobs"]["content"]
        assert chat[0]["token"] == first
        opted_out = client.post("/v1/completions", json={
            "prompt": "x", "max_tokens": 1, "logprobs": 0,
            "return_tokens_as_token_ids": False}).json()["choices"][0]["logprobs"]
        assert opted_out["tokens"] == [" w0"]
