"""The engine's gRPC surface over a real socket: generated stubs, reflection without stubs,
health, and a clear INVALID_ARGUMENT/NOT_FOUND for each bad input (the server keeps serving)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from engine_process import EngineProcess
from google.protobuf import descriptor_pool, message_factory
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status

from protoserve.v1 import (
    common_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)


@pytest.fixture(scope="module")
def engine(shared_server: Callable[..., EngineProcess]) -> EngineProcess:
    # Shared with test_grpc_fuzz.py (same flags).
    return shared_server("--max-model-len", "256")


@pytest.fixture(scope="module")
def channel(engine: EngineProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(engine.grpc_address) as ch:
        yield ch


def _generate(channel: grpc.Channel, request: inference_pb2.GenerateRequest):
    return list(inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60))


def _greedy(max_tokens: int) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def test_health_liveness_and_readiness(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "protoserve.v1.Inference"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_generate_streams_typed_events(channel: grpc.Channel) -> None:
    request = inference_pb2.GenerateRequest(text="The quick brown fox", sampling=_greedy(12))
    events = _generate(channel, request)
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "started" and kinds[-2:] == ["finished", "usage"]
    assert set(kinds[1:-2]) == {"delta"}
    token_ids = [t for e in events if e.HasField("delta") for t in e.delta.token_ids]
    text = "".join(e.delta.text for e in events if e.HasField("delta"))
    finished, usage = events[-2].finished, events[-1].usage
    assert len(token_ids) == 12 == finished.completion_tokens == usage.completion_tokens
    assert finished.reason == inference_pb2.FINISH_REASON_LENGTH
    assert usage.prompt_tokens == events[0].started.prompt_tokens > 0
    detok = tokenizer_pb2_grpc.TokenizerStub(channel).Detokenize(
        tokenizer_pb2.DetokenizeRequest(token_ids=token_ids), timeout=10
    )
    assert text == detok.text
    # Greedy decoding is deterministic; the prefix cache must not change the tokens.
    again = _generate(channel, request)
    assert [t for e in again if e.HasField("delta") for t in e.delta.token_ids] == token_ids


def test_chat_input_is_templated_by_the_engine(channel: grpc.Channel) -> None:
    chat = common_pb2.ChatInput(messages=[common_pb2.ChatMessage(role="user", text="Hello")])
    rendered = tokenizer_pb2_grpc.TokenizerStub(channel).RenderChat(
        tokenizer_pb2.RenderChatRequest(chat=chat), timeout=10
    )
    assert "Hello" in rendered.prompt and rendered.prompt.endswith("assistant\n")
    events = _generate(channel, inference_pb2.GenerateRequest(chat=chat, sampling=_greedy(4)))
    assert events[0].started.prompt_text == rendered.prompt
    assert events[0].started.prompt_tokens == len(rendered.token_ids)


def test_request_id_from_metadata_is_echoed(channel: grpc.Channel) -> None:
    stub = inference_pb2_grpc.InferenceStub(channel)
    call = stub.Generate(
        inference_pb2.GenerateRequest(text="hi", sampling=_greedy(2)),
        metadata=(("x-request-id", "req-abc-123"),), timeout=30,
    )
    events = list(call)
    assert dict(call.initial_metadata())["x-request-id"] == "req-abc-123"
    assert events[0].started.request_id == "req-abc-123"


def test_discovery(channel: grpc.Channel, tiny_llama_dir: Path) -> None:
    stub = discovery_pb2_grpc.DiscoveryStub(channel)
    models = stub.ListModels(discovery_pb2.ListModelsRequest(), timeout=10).models
    assert len(models) == 1 and models[0].max_model_len == 256
    assert models[0].id == str(tiny_llama_dir)
    assert stub.GetServerInfo(discovery_pb2.GetServerInfoRequest(), timeout=10).version


def test_generate_through_reflection_without_stubs(engine: EngineProcess) -> None:
    """What grpcurl does: discover the schema from the server, then call it dynamically."""
    with grpc.insecure_channel(engine.grpc_address) as ch:
        database = ProtoReflectionDescriptorDatabase(ch)
        services = set(database.get_services())
        assert {"protoserve.v1.Inference", "protoserve.v1.Tokenizer", "grpc.health.v1.Health"} <= services
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName("protoserve.v1.Inference").FindMethodByName("Generate")
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        request = request_cls()
        request.text = "reflection works"
        request.sampling.max_tokens = 3
        request.sampling.temperature = 0.0
        call = ch.unary_stream(
            "/protoserve.v1.Inference/Generate",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )
        events = list(call(request, timeout=30))
        assert events[-1].usage.completion_tokens == 3


def _error(channel: grpc.Channel, request: inference_pb2.GenerateRequest) -> tuple[grpc.StatusCode, str | None]:
    with pytest.raises(grpc.RpcError) as info:
        _generate(channel, request)
    error = info.value
    status = rpc_status.from_call(error)
    field = None
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            field = bad_request.field_violations[0].field
    return error.code(), field


BAD_SAMPLING = {
    "temperature": common_pb2.SamplingParams(temperature=-0.5),
    "top_p": common_pb2.SamplingParams(top_p=0.0),
    "max_tokens": common_pb2.SamplingParams(max_tokens=-1),
}


@pytest.mark.parametrize(
    ("request_pb", "field"),
    [
        (inference_pb2.GenerateRequest(text=""), "prompt"),
        (inference_pb2.GenerateRequest(), "input"),
        (inference_pb2.GenerateRequest(text="word " * 400), "prompt"),
        (inference_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=[10**6])), "prompt"),
        (inference_pb2.GenerateRequest(text="hi", sampling=common_pb2.SamplingParams(top_p=1.5)), "top_p"),
        (inference_pb2.GenerateRequest(text="hi", sampling=common_pb2.SamplingParams(max_tokens=0)), "max_tokens"),
        (inference_pb2.GenerateRequest(text="hi", sampling=common_pb2.SamplingParams(max_tokens=10**6)), "max_tokens"),
        *[(inference_pb2.GenerateRequest(text="hi", sampling=s), f) for f, s in BAD_SAMPLING.items()],
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(
    channel: grpc.Channel, request_pb: inference_pb2.GenerateRequest, field: str
) -> None:
    code, reported_field = _error(channel, request_pb)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert reported_field == field
    # The server keeps serving everyone else.
    ok = _generate(channel, inference_pb2.GenerateRequest(text="still fine", sampling=_greedy(2)))
    assert ok[-1].usage.completion_tokens == 2


def test_unknown_model_is_not_found(channel: grpc.Channel) -> None:
    code, field = _error(channel, inference_pb2.GenerateRequest(model="nope", text="hi"))
    assert code == grpc.StatusCode.NOT_FOUND and field == "model"


def test_invalid_utf8_is_invalid_argument(channel: grpc.Channel) -> None:
    # Field 3 (text), wire type 2, with bytes that are not UTF-8: stubs cannot even build it.
    payload = b"\x1a\x03\xff\xfe\xfd"
    call = channel.unary_stream(
        "/protoserve.v1.Inference/Generate",
        request_serializer=lambda raw: raw,
        response_deserializer=inference_pb2.GenerateResponse.FromString,
    )
    with pytest.raises(grpc.RpcError) as info:
        list(call(payload, timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in info.value.details()
