"""`--api-key` / PROTOSERVE_API_KEY: Bearer auth on REST (OpenAI envelope) and on gRPC
(UNAUTHENTICATED), with health and reflection open by default."""
from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from engine_process import EngineProcess, free_port, start_engine
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine.config import EngineConfig, ModelConfig
from engine.server.grpc_server import EngineServer, GrpcServerConfig
from protoserve.v1 import discovery_pb2, discovery_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def keyed_server(tiny_llama_dir: Path) -> Iterator[EngineProcess]:
    # The key comes from the environment: the bridge child must get it too, for REST clients
    # and for its own calls to the engine over the Unix socket.
    server = start_engine(tiny_llama_dir, role="all", env={"PROTOSERVE_API_KEY": KEY})
    try:
        yield server
    finally:
        server.stop()


def _client(server: EngineProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key=key, max_retries=0,
                         timeout=60)


def test_rest_rejects_missing_and_wrong_keys_with_the_envelope(keyed_server: EngineProcess) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        _client(keyed_server, "wrong").models.list()
    assert caught.value.status_code == 401
    reply = httpx.get(f"{keyed_server.http_url}/v1/models", timeout=10)
    assert reply.status_code == 401
    error = reply.json()["error"]
    assert error["type"] == "authentication_error" and error["message"]
    assert set(error) >= {"message", "type", "param", "code"}
    # The tokenizer routes sit outside /v1 but are covered too.
    assert httpx.post(f"{keyed_server.http_url}/tokenize", json={"prompt": "hi"},
                      timeout=10).status_code == 401


def test_rest_good_key_generates_through_the_engine(keyed_server: EngineProcess) -> None:
    client = _client(keyed_server, KEY)
    model = client.models.list().data[0].id
    # A completion proves the bridge also sends the key to the engine over the socket.
    completion = client.completions.create(model=model, prompt="Hello", max_tokens=3,
                                           temperature=0)
    assert completion.usage is not None and completion.usage.completion_tokens >= 1


def test_rest_health_stays_open(keyed_server: EngineProcess) -> None:
    assert httpx.get(f"{keyed_server.http_url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{keyed_server.http_url}/ping", timeout=10).status_code == 200


def test_grpc_requires_the_key(keyed_server: EngineProcess) -> None:
    with grpc.insecure_channel(keyed_server.grpc_address) as channel:
        stub = discovery_pb2_grpc.DiscoveryStub(channel)
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", KEY),)):
            with pytest.raises(grpc.RpcError) as caught:
                stub.ListModels(discovery_pb2.ListModelsRequest(), metadata=metadata, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        good = (("authorization", f"Bearer {KEY}"),)
        assert stub.ListModels(discovery_pb2.ListModelsRequest(), metadata=good,
                               timeout=10).models
        tokenizer = tokenizer_pb2_grpc.TokenizerStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            tokenizer.Tokenize(tokenizer_pb2.TokenizeRequest(text="hi"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _reflection_services(channel: grpc.Channel, metadata: tuple = ()) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10)
    return [service.name for reply in responses
            for service in reply.list_services_response.service]


def test_grpc_health_and_reflection_stay_open(keyed_server: EngineProcess) -> None:
    with grpc.insecure_channel(keyed_server.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert "protoserve.v1.Inference" in _reflection_services(channel)


def test_exemptions_can_be_switched_off() -> None:
    """--no-grpc-auth-exempt-health/-reflection: the key then covers them too (checked on a
    server that never loads a model, since only the interceptor matters here)."""

    async def scenario() -> None:
        port = free_port()
        server = EngineServer(
            EngineConfig(model=ModelConfig(model="unused")),
            GrpcServerConfig("127.0.0.1", port, api_key=KEY, auth_exempt_services=()),
        )
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                request = health_pb2.HealthCheckRequest(service="")
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await health.Check(request, timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
                good = (("authorization", f"Bearer {KEY}"),)
                reply = await health.Check(request, metadata=good, timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                call = stub.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    async for _ in call:
                        pass
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await server.stop(0)

    asyncio.run(scenario())
