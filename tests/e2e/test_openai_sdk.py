"""The official OpenAI SDK (and raw HTTP) against the real engine-serve with a tiny model."""
from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from served_engine import RunningServer

CONTEXT_LENGTH = 512  # the tiny model's max_position_embeddings
USER_HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def client(served_model: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served_model.base_url}/v1", api_key="x", max_retries=0,
                         timeout=60)


@pytest.fixture(scope="module")
def model_id(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_models_list(client: openai.OpenAI, served_model: RunningServer) -> None:
    models = client.models.list().data
    assert len(models) >= 1
    card = models[0].to_dict()
    assert card["object"] == "model" and card["owned_by"] == "protoserve"
    assert card["max_model_len"] == CONTEXT_LENGTH
    assert card["root"] == str(served_model.model_dir)


def test_completion_plain_and_streamed_agree_at_temperature_zero(client: openai.OpenAI,
                                                                 model_id: str) -> None:
    args: dict[str, Any] = {"model": model_id, "prompt": "Once upon a time", "max_tokens": 12,
                            "temperature": 0}
    plain = client.completions.create(**args)
    assert plain.object == "text_completion" and plain.id.startswith("cmpl-")
    choice = plain.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.text
    assert plain.usage is not None and plain.usage.completion_tokens >= 1
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    chunks = list(client.completions.create(**args, stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert len({chunk.id for chunk in chunks}) == 1


def test_chat_plain_and_streamed_agree_at_temperature_zero(
    client: openai.OpenAI, model_id: str
) -> None:
    args: dict[str, Any] = {"model": model_id, "messages": USER_HELLO, "max_tokens": 10,
                            "temperature": 0}
    plain = client.chat.completions.create(**args)
    assert plain.object == "chat.completion" and plain.id.startswith("chatcmpl-")
    message = plain.choices[0].message
    assert message.role == "assistant" and message.content
    chunks = list(client.chat.completions.create(**args, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_stream_options_include_usage_ends_with_a_usage_chunk(client: openai.OpenAI,
                                                              model_id: str) -> None:
    plain = client.chat.completions.create(model=model_id, messages=USER_HELLO, max_tokens=5,
                                           temperature=0)
    chunks = list(client.chat.completions.create(
        model=model_id, messages=USER_HELLO, max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens == plain.usage.prompt_tokens
    assert last.usage.completion_tokens == plain.usage.completion_tokens
    assert all(chunk.usage is None for chunk in chunks[:-1])
    completion_chunks = list(client.completions.create(
        model=model_id, prompt="abc", max_tokens=3, stream=True,
        stream_options={"include_usage": True}))
    assert completion_chunks[-1].usage.completion_tokens == 3


def test_request_id_header_names_the_response(client: openai.OpenAI, model_id: str,
                                              served_model: RunningServer) -> None:
    request_id = f"e2e-{uuid.uuid4().hex[:8]}"
    completion = client.completions.with_raw_response.create(
        model=model_id, prompt="x", max_tokens=2, extra_headers={"X-Request-Id": request_id})
    assert completion.headers["x-request-id"] == request_id
    assert completion.parse().id == f"cmpl-{request_id}"
    response = httpx.post(f"{served_model.base_url}/v1/chat/completions", timeout=60,
                          headers={"X-Request-Id": request_id + "c"},
                          json={"model": model_id, "messages": USER_HELLO, "max_tokens": 2})
    assert response.headers["x-request-id"] == request_id + "c"
    assert response.json()["id"] == f"chatcmpl-{request_id}c"


BAD_COMPLETIONS: list[tuple[str, dict[str, Any], int, str | None]] = [
    ("empty prompt", {"prompt": ""}, 400, "prompt"),
    ("prompt longer than the context", {"prompt": [5] * (CONTEXT_LENGTH + 10)}, 400, "prompt"),
    ("negative max_tokens", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("zero max_tokens", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("negative temperature", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("top_p zero", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top_p above one", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("temperature of the wrong type", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("max_tokens of the wrong type", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("unknown model", {"prompt": "x", "model": "no-such-model"}, 404, "model"),
]


@pytest.mark.parametrize(("case", "body", "status", "param"), BAD_COMPLETIONS,
                         ids=[case[0] for case in BAD_COMPLETIONS])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_completion_inputs_are_named_and_the_server_keeps_serving(
    served_model: RunningServer, model_id: str, case: str, body: dict[str, Any], status: int,
    param: str | None, stream: bool, good_request: Callable[[], None],
) -> None:
    response = httpx.post(f"{served_model.base_url}/v1/completions", timeout=60,
                          json={"model": model_id, "max_tokens": 4, **body, "stream": stream})
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert error["message"]
    good_request()


def test_bad_chat_inputs_through_the_sdk(client: openai.OpenAI, model_id: str,
                                         good_request: Callable[[], None]) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model_id, messages=[], max_tokens=4)
    assert caught.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model_id, messages=USER_HELLO, temperature=-1,
                                       stream=True)
    assert caught.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=USER_HELLO)
    assert caught.value.param == "model" and caught.value.type == "not_found_error"
    good_request()


@pytest.mark.parametrize(
    "raw_body",
    [b'{"prompt": "x", "max_tokens": ', b'{"prompt": "\xff\xfe\xfd", "max_tokens": 2}',
     b"not json at all"],
    ids=["truncated JSON", "invalid UTF-8", "not JSON"],
)
def test_malformed_bodies_are_400_envelopes(served_model: RunningServer, raw_body: bytes,
                                            good_request: Callable[[], None]) -> None:
    response = httpx.post(f"{served_model.base_url}/v1/completions", content=raw_body,
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    good_request()


@pytest.fixture
def good_request(client: openai.OpenAI, model_id: str) -> Callable[[], None]:
    """A request that must succeed: errors before it left no damage behind."""

    def run() -> None:
        completion = client.completions.create(model=model_id, prompt="still fine",
                                               max_tokens=2, temperature=0)
        assert completion.choices[0].finish_reason in ("stop", "length")

    return run
