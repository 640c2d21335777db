"""What the bridge answers on its own, with no engine behind it (FastAPI TestClient)."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from bridge_processes import reserve_port
from fastapi.testclient import TestClient

from rest_bridge.app import create_app
from rest_bridge.openai_schemas.responses import ErrorResponse
from rest_bridge.settings import BridgeSettings


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    # Nothing listens on this port: every engine call fails fast with UNAVAILABLE.
    settings = BridgeSettings(engine_address=f"127.0.0.1:{reserve_port()}")
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def assert_envelope(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    ErrorResponse.model_validate(body)
    assert body["error"]["param"] == param
    return body["error"]


def test_ping_is_alive_without_an_engine(client: TestClient) -> None:
    response = client.get("/ping")
    assert response.status_code == 200


def test_openapi_says_ping_and_health_answer_an_empty_body(client: TestClient) -> None:
    """Generated clients and fuzzers learn the contract from /openapi.json: a 200 with no
    content there, and none on the wire."""
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/ping", "/health"):
        assert "content" not in paths[path]["get"]["responses"]["200"], path
    assert "application/json" in paths["/health"]["get"]["responses"]["503"]["content"]
    response = client.get("/ping")
    assert response.content == b"" and "content-type" not in response.headers


def test_health_is_503_while_the_engine_is_unreachable(client: TestClient) -> None:
    error = assert_envelope(client.get("/health"), 503)
    assert error["type"] == "service_unavailable_error"


def test_unknown_route_and_wrong_method(client: TestClient) -> None:
    assert assert_envelope(client.get("/v2/nothing"), 404)["type"] == "not_found_error"
    assert_envelope(client.get("/v1/completions"), 405)


def test_malformed_json_and_invalid_utf8(client: TestClient) -> None:
    headers = {"content-type": "application/json"}
    error = assert_envelope(client.post("/v1/completions", content=b'{"prompt": ', headers=headers),
                            400)
    assert "JSON" in error["message"]
    error = assert_envelope(
        client.post("/v1/chat/completions", content=b'{"messages": "\xff\xfe"}', headers=headers),
        400)
    assert "UTF-8" in error["message"]


def test_body_without_content_type_is_still_json(client: TestClient) -> None:
    # Reaches validation (so it was parsed): the missing prompt is named.
    response = client.post("/v1/completions", content=b'{"model": "m"}')
    assert_envelope(response, 400, "prompt")


def test_non_object_body(client: TestClient) -> None:
    assert_envelope(client.post("/v1/completions", json=[1, 2]), 400)
    form = client.post("/v1/completions", content=b"prompt=x",
                       headers={"content-type": "application/x-www-form-urlencoded"})
    assert "application/json" in assert_envelope(form, 400)["message"]


# A valid message list, so that the field under test is the one refused.
HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
        ("/v1/completions", {"prompt": {"text": "x"}}, "prompt"),
        ("/v1/completions", {"prompt": "x", "stop": 5}, "stop"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
        ("/v1/completions", {"prompt": "x", "stream_options": {}}, "stream_options"),
        ("/v1/chat/completions", {"messages": "hi"}, "messages"),
        ("/v1/chat/completions", {"messages": [{"content": "x"}]}, "messages.0.role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]},
         "messages.0.content"),
        ("/v1/chat/completions", {"messages": HI, "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": HI, "tool_choice": "sometimes"}, "tool_choice"),
        ("/v1/chat/completions", {"messages": HI, "request_id": "naïve"}, "request_id"),
    ],
)
def test_bad_bodies_name_the_field(client: TestClient, path: str, body: dict[str, Any],
                                   param: str) -> None:
    error = assert_envelope(client.post(path, json=body), 400, param)
    assert error["type"] == "invalid_request_error"


def test_engine_unreachable_is_503_with_the_envelope(client: TestClient) -> None:
    response = client.post("/v1/completions", json={"model": "m", "prompt": "x"})
    assert assert_envelope(response, 503)["type"] == "service_unavailable_error"
    assert assert_envelope(client.get("/v1/models"), 503)["type"] == "service_unavailable_error"


def test_request_id_is_echoed_or_generated(client: TestClient) -> None:
    response = client.get("/ping", headers={"X-Request-Id": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42"
    first = client.get("/ping").headers["x-request-id"]
    second = client.get("/ping").headers["x-request-id"]
    assert len(first) == 32 and first != second
    # Errors carry it too.
    failed = client.post("/v1/completions", json={"prompt": 1.5},
                         headers={"X-Request-Id": "trace-43"})
    assert failed.status_code == 400 and failed.headers["x-request-id"] == "trace-43"


def test_request_id_that_cannot_travel_as_grpc_metadata_is_refused(client: TestClient) -> None:
    response = client.get("/ping", headers={"X-Request-Id": "x" * 300})
    assert_envelope(response, 400, "X-Request-Id")


def test_api_key_guards_v1_only() -> None:
    settings = BridgeSettings(engine_address=f"127.0.0.1:{reserve_port()}", api_key="sesame")
    with TestClient(create_app(settings)) as guarded:
        error = assert_envelope(guarded.post("/v1/completions", json={"prompt": "x"}), 401)
        assert error["type"] == "authentication_error"
        wrong = guarded.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert_envelope(wrong, 401)
        assert guarded.get("/ping").status_code == 200
        # The right key gets through to the (absent) engine.
        right = guarded.get("/v1/models", headers={"Authorization": "Bearer sesame"})
        assert_envelope(right, 503)


def test_openapi_document_lists_the_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ping"} <= set(
        paths)


def test_api_key_still_applies_behind_a_root_path() -> None:
    settings = BridgeSettings(engine_address=f"127.0.0.1:{reserve_port()}", api_key="sesame",
                              root_path="/api")
    with TestClient(create_app(settings), root_path="/api") as proxied:
        assert_envelope(proxied.get("/api/v1/models"), 401)
        assert_envelope(proxied.get("/v1/models"), 401)
        assert proxied.get("/api/ping").status_code == 200
