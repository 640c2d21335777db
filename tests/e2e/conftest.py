"""End-to-end fixtures: the real `engine-serve` (engine + bridge subprocesses) on 127.0.0.1,
serving the suite's tiny Llama; and clients of a module's own `server` (an EngineProcess
fixture each module starts with the flags it needs)."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest
from engine_process import EngineProcess
from served_engine import (
    REPO_ROOT,
    SERVER_START_TIMEOUT_S,
    RunningServer,
    reserve_port,
    stop_process_group,
    wait_for_health,
)

from protoserve.v1 import inference_pb2_grpc


@pytest.fixture(scope="session")
def served_model(tiny_llama_dir: Path) -> Iterator[RunningServer]:
    port, grpc_port = reserve_port(), reserve_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "--model", str(tiny_llama_dir),
         "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port),
         "--kv-cache-memory", "64MiB", "--dtype", "float32"],
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base_url, process, SERVER_START_TIMEOUT_S)
        yield RunningServer(base_url=base_url, grpc_port=grpc_port, model_dir=tiny_llama_dir)
    finally:
        stop_process_group(process)


@pytest.fixture(scope="module")
def stub(server: EngineProcess) -> Iterator[inference_pb2_grpc.InferenceStub]:
    """gRPC Inference stub on the requesting module's `server`."""
    with grpc.insecure_channel(server.grpc_address) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


@pytest.fixture(scope="module")
def client(server: EngineProcess) -> openai.OpenAI:
    """OpenAI SDK client of the requesting module's `server`'s bridge."""
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0)
