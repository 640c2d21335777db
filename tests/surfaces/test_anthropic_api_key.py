"""`--api-key` on the Anthropic surface: the anthropic SDK sends the key as `x-api-key` (not a
bearer token); a wrong key is the SDK's AuthenticationError, in Anthropic's error shape."""
from __future__ import annotations

import anthropic
import httpx
import pytest
from engine_process import EngineProcess
from surface_names import API_KEY, MAIN_NAME

HELLO = [{"role": "user", "content": "Hello"}]


def _client(server: EngineProcess, key: str) -> anthropic.Anthropic:
    assert server.http_url is not None
    return anthropic.Anthropic(base_url=server.http_url, api_key=key, max_retries=0, timeout=60)


def test_x_api_key_authorizes_messages_and_count_tokens(surfaces_server: EngineProcess) -> None:
    client = _client(surfaces_server, API_KEY)
    message = client.messages.create(model=MAIN_NAME, max_tokens=2, messages=HELLO)
    assert message.model == MAIN_NAME and message.usage.output_tokens >= 1
    counted = client.messages.count_tokens(model=MAIN_NAME, messages=HELLO)
    assert counted.input_tokens == message.usage.input_tokens


def test_a_wrong_or_missing_key_is_an_authentication_error(
    surfaces_server: EngineProcess,
) -> None:
    with pytest.raises(anthropic.AuthenticationError) as refused:
        _client(surfaces_server, "wrong").messages.create(model=MAIN_NAME, max_tokens=2,
                                                          messages=HELLO)
    assert refused.value.status_code == 401
    assert refused.value.body["type"] == "error"  # type: ignore[index]
    assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    response = httpx.post(f"{surfaces_server.http_url}/v1/messages/count_tokens", timeout=30,
                          json={"model": MAIN_NAME, "messages": HELLO})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
