"""Chat features on a real engine-serve (engine + bridge): media refused for a text-only
model over gRPC and REST, tool_choice "none", content parts and add_special_tokens."""
from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from engine_process import EngineProcess, start_engine

from protoserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

SERVED_NAME = "tiny-chat"
# A 1x1 PNG header is enough: the bridge sizes images from their header.
TINY_PNG = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01"
            b"\x08\x02\x00\x00\x00\x90wS\xde")


@pytest.fixture(scope="module")
def served(tiny_llama_dir: Path) -> Iterator[EngineProcess]:
    handle = start_engine(tiny_llama_dir, "--max-model-len", "256", "--served-model-name",
                          SERVED_NAME, "--enable-auto-tool-choice", "--tool-call-parser",
                          "hermes", "--max-media-bytes", "1024", role="all")
    yield handle
    handle.stop()


def _generate(address: str, request: inference_pb2.GenerateRequest) -> list[object]:
    with grpc.insecure_channel(address) as channel:
        return list(inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60))


def test_grpc_image_and_audio_parts_are_refused_for_a_text_only_model(
    served: EngineProcess,
) -> None:
    huge = "A" * 2_000_000  # never decoded: the model takes no audio at all
    for part, kind in (
        (common_pb2.ContentPart(image_url=common_pb2.ImageUrl(url="data:image/png;base64,AA==")),
         "image"),
        (common_pb2.ContentPart(input_audio=common_pb2.InputAudio(data=huge, format="wav")),
         "audio"),
    ):
        message = common_pb2.ChatMessage(role="user")
        message.parts.parts.extend([common_pb2.ContentPart(text="look"), part])
        request = inference_pb2.GenerateRequest(
            chat=common_pb2.ChatInput(messages=[message]),
            sampling=common_pb2.SamplingParams(max_tokens=2))
        with pytest.raises(grpc.RpcError) as raised:
            _generate(served.grpc_address, request)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"model '{SERVED_NAME}' does not accept {kind} input" in raised.value.details()


def test_rest_image_passes_the_bridge_limits_then_the_engine_refuses_it(
    served: EngineProcess,
) -> None:
    url = f"data:image/png;base64,{base64.b64encode(TINY_PNG).decode()}"
    body = {"model": SERVED_NAME, "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": url}}]}]}
    response = httpx.post(f"{served.http_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    assert "does not accept image input" in response.json()["error"]["message"]
    body["messages"][0]["content"][1]["image_url"]["url"] = (
        "data:image/png;base64," + "A" * 4000)
    response = httpx.post(f"{served.http_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400 and "limit of 1024 bytes" in response.text


def test_text_parts_tools_and_special_tokens_render_and_generate(served: EngineProcess) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body = {"model": SERVED_NAME, "max_tokens": 3, "temperature": 0,
            "add_special_tokens": True, "tools": [tool], "tool_choice": "none",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                      {"type": "text", "text": "there"}]}]}
    response = httpx.post(f"{served.http_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    assert response.json()["usage"]["completion_tokens"] >= 1
