"""End-to-end fixtures: the real `engine-serve` (engine + bridge subprocesses) on 127.0.0.1,
serving the suite's tiny Llama; and clients of a module's own `server` (an EngineProcess
fixture each module provides with the flags it needs, shared through `shared_server` where
another module asks for the same flags)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import openai
import pytest
from engine_process import START_TIMEOUT_S, EngineProcess
from served_engine import RunningServer, wait_for_health

from protoserve.v1 import inference_pb2_grpc


@pytest.fixture(scope="session")
def served_model(
    shared_server: Callable[..., EngineProcess], tiny_llama_dir: Path
) -> RunningServer:
    """engine-serve with its defaults (`--role all`), the bridge healthy."""
    server = shared_server(role="all")
    assert server.http_url is not None
    wait_for_health(server.http_url, server.process, START_TIMEOUT_S)
    return RunningServer(base_url=server.http_url,
                         grpc_port=int(server.grpc_address.rsplit(":", 1)[1]),
                         model_dir=tiny_llama_dir)


@pytest.fixture(scope="module")
def stub(server: EngineProcess) -> Iterator[inference_pb2_grpc.InferenceStub]:
    """gRPC Inference stub on the requesting module's `server`."""
    with grpc.insecure_channel(server.grpc_address) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


@pytest.fixture(scope="module")
def client(server: EngineProcess) -> openai.OpenAI:
    """OpenAI SDK client of the requesting module's `server`'s bridge."""
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0)
