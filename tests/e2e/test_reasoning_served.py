"""Reasoning and typed parse events against the real engine, on a tiny random model whose
tokenizer has `<think>` / `</think>` (tests/thinking_model.py): engine-serve with
--reasoning-parser qwen3 answers the OpenAI SDK with reasoning_content / reasoning (streamed
and not), a guided choice holds only the answer after `</think>` (never the reasoning), and
gRPC clients read the same as typed `parsed` events, tool calls included.

A random model writes `</think>` when it likes; a logit_bias on it makes that happen within a
few tokens, and the seeds make each run repeat exactly."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from engine_process import EngineProcess
from openai import OpenAI
from thinking_model import build_thinking_model, think_token_ids

from protoserve.v1 import (
    common_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)

CHOICES = ["Paris", "Rome"]
MESSAGES = [{"role": "user", "content": "Capital of France?"}]


@pytest.fixture(scope="module")
def thinking_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_thinking_model(tmp_path_factory.mktemp("thinking-served"))


@pytest.fixture(scope="module")
def server(shared_server: Callable[..., EngineProcess], thinking_dir: Path) -> EngineProcess:
    return shared_server("--reasoning-parser", "qwen3", "--enable-auto-tool-choice",
                         "--tool-call-parser", "hermes", role="all", model_dir=thinking_dir)


@pytest.fixture(scope="module")
def client(server: EngineProcess) -> OpenAI:
    return OpenAI(base_url=f"{server.http_url}/v1", api_key="x", max_retries=0, timeout=120)


def _ask(client: OpenAI, thinking_dir: Path, seed: int, **extra: Any) -> dict[str, Any]:
    _, end = think_token_ids(thinking_dir)
    return dict(model=client.models.list().data[0].id, messages=MESSAGES, max_tokens=40,
                temperature=1.0, seed=seed, logit_bias={str(end): 4},
                extra_body={"guided_choice": CHOICES, **extra})


def test_reasoning_then_a_guided_answer_streamed_and_not(client: OpenAI,
                                                         thinking_dir: Path) -> None:
    with_reasoning = 0
    for seed in range(4):
        args = _ask(client, thinking_dir, seed)
        message = client.chat.completions.create(**args).choices[0].message
        extra = message.model_extra or {}
        assert extra["reasoning"] == extra["reasoning_content"]
        if extra["reasoning_content"]:
            with_reasoning += 1
            # The choice constraint held the answer only: the reasoning ran free before it.
            assert extra["reasoning_content"] not in CHOICES
        assert message.content in CHOICES
        reasoning, content = "", ""
        for chunk in client.chat.completions.create(**args, stream=True):
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            delta_extra = delta.model_extra or {}
            assert delta_extra.get("reasoning") == delta_extra.get("reasoning_content")
            reasoning += delta_extra.get("reasoning_content") or ""
            content += delta.content or ""
        assert (reasoning or None, content) == (extra["reasoning_content"], message.content)
    assert with_reasoning, "no seed wrote any reasoning before </think>"


def test_thinking_switched_off_answers_with_content_only(client: OpenAI,
                                                         thinking_dir: Path) -> None:
    args = _ask(client, thinking_dir, 0, chat_template_kwargs={"enable_thinking": False})
    message = client.chat.completions.create(**args).choices[0].message
    assert (message.model_extra or {})["reasoning_content"] is None
    assert message.content in CHOICES


def _generate(server: EngineProcess, request: inference_pb2.GenerateRequest
              ) -> list[inference_pb2.GenerateResponse]:
    with grpc.insecure_channel(server.grpc_address) as channel:
        return list(inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=120))


def test_grpc_streams_reasoning_and_tool_calls_as_typed_events(
    server: EngineProcess, thinking_dir: Path
) -> None:
    """tool_choice "required" after the reasoning: the JSON list constraint starts at
    </think>, and the calls arrive as ToolCallDelta events with finish reason TOOL_CALLS."""
    _, end = think_token_ids(thinking_dir)
    tool = {"type": "function", "function": {"name": "capital", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "enum": CHOICES}},
        "required": ["city"], "additionalProperties": False}}}
    schema = {"type": "array", "minItems": 1, "maxItems": 1, "items": {
        "type": "object", "properties": {"name": {"enum": ["capital"]},
                                         "parameters": tool["function"]["parameters"]},
        "required": ["name", "parameters"], "additionalProperties": False}}
    request = inference_pb2.GenerateRequest(
        sampling=common_pb2.SamplingParams(temperature=1.0, seed=1, max_tokens=80,
                                           logit_bias={end: 4.0}),
        constraint=common_pb2.OutputConstraint(json_schema=json.dumps(schema),
                                               whitespace_pattern=""),
        parsing=inference_pb2.OutputParsing(reasoning_parser="qwen3"),
    )
    request.chat.messages.add(role="user", text="Capital of France?")
    request.chat.tool_choice = "required"
    request.chat.tools.add().update(tool)
    events = _generate(server, request)
    deltas = [e.delta for e in events if e.WhichOneof("event") == "delta"]
    assert deltas and all(d.HasField("parsed") for d in deltas)
    reasoning = "".join(d.parsed.reasoning for d in deltas)
    text = "".join(d.text for d in deltas)
    assert text.startswith(reasoning) and "</think>" in text
    calls = [c for d in deltas for c in d.parsed.tool_calls]
    assert calls[0].id and calls[0].name == "capital"
    arguments = json.loads("".join(c.arguments for c in calls))
    assert arguments["city"] in CHOICES
    (finished,) = [e.finished for e in events if e.WhichOneof("event") == "finished"]
    assert finished.reason == inference_pb2.FINISH_REASON_TOOL_CALLS


def test_grpc_chat_without_parsing_gets_the_servers_parsers(server: EngineProcess) -> None:
    request = inference_pb2.GenerateRequest(
        sampling=common_pb2.SamplingParams(temperature=1.0, seed=3, max_tokens=6))
    request.chat.messages.add(role="user", text="Hi")
    deltas = [e.delta for e in _generate(server, request) if e.WhichOneof("event") == "delta"]
    # The prompt opened the think block: with no </think> in 6 tokens all is reasoning.
    assert all(d.HasField("parsed") for d in deltas)
    text = "".join(d.text for d in deltas)
    reasoning = "".join(d.parsed.reasoning for d in deltas)
    content = "".join(d.parsed.content for d in deltas)
    assert reasoning and reasoning + ("</think>" if "</think>" in text else "") + content == text


def test_unknown_parser_is_invalid_argument_naming_the_field(server: EngineProcess) -> None:
    request = inference_pb2.GenerateRequest(
        text="Hi", parsing=inference_pb2.OutputParsing(reasoning_parser="nope"))
    with pytest.raises(grpc.RpcError) as raised:
        _generate(server, request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown reasoning parser 'nope'" in (raised.value.details() or "")


def test_discovery_lists_the_parser_names_and_the_servers_defaults(server: EngineProcess) -> None:
    with grpc.insecure_channel(server.grpc_address) as channel:
        info = discovery_pb2_grpc.DiscoveryStub(channel).GetServerInfo(
            discovery_pb2.GetServerInfoRequest(), timeout=30)
    assert {"deepseek_r1", "qwen3", "mistral"} <= set(info.reasoning_parsers)
    assert {"hermes", "pythonic", "qwen3_coder", "jamba"} <= set(info.tool_parsers)
    assert (info.default_reasoning_parser, info.default_tool_parser) == ("qwen3", "hermes")
