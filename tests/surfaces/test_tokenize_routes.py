"""POST /tokenize (completion and chat forms), POST /detokenize and GET /version against
the engine's Tokenizer and Discovery services."""
from __future__ import annotations

from typing import Any

import grpc
import httpx
import pytest
from surface_names import ALIAS_NAME, API_KEY, MAIN_NAME
from engine_process import EngineProcess

from protoserve.v1 import (
    common_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)

AUTH = {"Authorization": f"Bearer {API_KEY}"}
GRPC_AUTH = (("authorization", f"Bearer {API_KEY}"),)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
CONTEXT_LENGTH = 512  # the tiny model's max_position_embeddings


def _post(server: EngineProcess, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.http_url}{path}", json=body, headers=AUTH, timeout=30)


def test_tokenize_completion_form(surfaces_server: EngineProcess) -> None:
    reply = _post(surfaces_server, "/tokenize",
                  {"model": MAIN_NAME, "prompt": "Hello world", "return_token_strs": True})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["count"] == len(body["tokens"]) > 0
    assert body["max_model_len"] == CONTEXT_LENGTH
    assert len(body["token_strs"]) == body["count"]
    plain = _post(surfaces_server, "/tokenize", {"prompt": "Hello world",
                                                 "add_special_tokens": False}).json()
    assert "token_strs" not in plain
    # add_special_tokens (default true) adds the BOS token the tiny tokenizer defines.
    assert body["tokens"][-len(plain["tokens"]):] == plain["tokens"]
    assert plain["count"] <= body["count"]


def test_tokenize_chat_form_matches_render_chat(surfaces_server: EngineProcess) -> None:
    reply = _post(surfaces_server, "/tokenize", {"model": ALIAS_NAME, "messages": MESSAGES})
    assert reply.status_code == 200, reply.text
    tokens = reply.json()["tokens"]
    chat = common_pb2.ChatInput(add_generation_prompt=True)
    for message in MESSAGES:
        chat.messages.append(common_pb2.ChatMessage(role=message["role"],
                                                    text=message["content"]))
    with grpc.insecure_channel(surfaces_server.grpc_address) as channel:
        stub = tokenizer_pb2_grpc.TokenizerStub(channel)
        rendered = stub.RenderChat(tokenizer_pb2.RenderChatRequest(chat=chat),
                                   metadata=GRPC_AUTH, timeout=30)
    assert tokens == list(rendered.token_ids)
    without_prompt = _post(surfaces_server, "/tokenize",
                           {"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert without_prompt["count"] < len(tokens)


def test_tokenize_chat_form_continues_the_final_message(surfaces_server: EngineProcess) -> None:
    """continue_final_message: the prompt ends inside the last (assistant) message, exactly
    as the engine renders it, and it cannot be combined with a generation prompt."""
    messages = [*MESSAGES, {"role": "assistant", "content": "Hi, I am"}]
    body = {"messages": messages, "add_generation_prompt": False,
            "continue_final_message": True, "return_token_strs": True}
    reply = _post(surfaces_server, "/tokenize", body)
    assert reply.status_code == 200, reply.text
    chat = common_pb2.ChatInput(add_generation_prompt=False, continue_final_message=True)
    for message in messages:
        chat.messages.append(common_pb2.ChatMessage(role=message["role"],
                                                    text=message["content"]))
    with grpc.insecure_channel(surfaces_server.grpc_address) as channel:
        rendered = tokenizer_pb2_grpc.TokenizerStub(channel).RenderChat(
            tokenizer_pb2.RenderChatRequest(chat=chat), metadata=GRPC_AUTH, timeout=30)
    assert reply.json()["tokens"] == list(rendered.token_ids)
    assert rendered.prompt.endswith("Hi, I am")
    both = _post(surfaces_server, "/tokenize", {**body, "add_generation_prompt": True})
    assert both.status_code == 400 and both.json()["error"]["param"] == "continue_final_message"


def test_tokenize_chat_form_passes_tools_to_the_template(surfaces_server: EngineProcess) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    template = "{% for tool in tools %}[{{ tool.function.name }}]{% endfor %}"
    reply = _post(surfaces_server, "/tokenize", {
        "messages": MESSAGES, "tools": tools, "chat_template": template,
        "add_special_tokens": False, "return_token_strs": True})
    assert reply.status_code == 200, reply.text
    expected = _post(surfaces_server, "/tokenize", {"prompt": "[get_weather]",
                                                    "add_special_tokens": False}).json()
    assert reply.json()["tokens"] == expected["tokens"]


def test_detokenize_round_trip(surfaces_server: EngineProcess) -> None:
    text = "The quick brown fox"
    tokens = _post(surfaces_server, "/tokenize",
                   {"prompt": text, "add_special_tokens": False}).json()["tokens"]
    reply = _post(surfaces_server, "/detokenize", {"model": MAIN_NAME, "tokens": tokens})
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"prompt": text}


def test_errors_use_the_envelope(surfaces_server: EngineProcess) -> None:
    unknown = _post(surfaces_server, "/tokenize", {"model": "nope", "prompt": "x"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    bad_id = _post(surfaces_server, "/detokenize", {"tokens": [10**9]})
    assert bad_id.status_code == 400 and bad_id.json()["error"]["param"] == "tokens"
    shapeless = _post(surfaces_server, "/tokenize", {"text": "x"})
    assert shapeless.status_code == 400 and "error" in shapeless.json()


def test_version_matches_discovery(surfaces_server: EngineProcess) -> None:
    reply = httpx.get(f"{surfaces_server.http_url}/version", timeout=10)
    assert reply.status_code == 200
    with grpc.insecure_channel(surfaces_server.grpc_address) as channel:
        info = discovery_pb2_grpc.DiscoveryStub(channel).GetServerInfo(
            discovery_pb2.GetServerInfoRequest(), metadata=GRPC_AUTH, timeout=10)
    assert reply.json() == {"version": info.version} and info.version


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
def test_tokenizer_routes_need_the_key(surfaces_server: EngineProcess, path: str) -> None:
    reply = httpx.post(f"{surfaces_server.http_url}{path}", json={"prompt": "x", "tokens": [1]},
                       timeout=10)
    assert reply.status_code == 401
