"""Scoring and reranking end to end, raw HTTP (what Jina/Cohere-style RAG clients send) and
gRPC Inference/Score, against one server holding a generative tiny Llama ("llama") and, as
`--embedding-model`, a tiny random BERT cross-encoder ("ce"). Reference scores come from
sentence-transformers' CrossEncoder and logits from transformers on the same checkpoint."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import torch
from cross_encoder_factory import make_bert_classifier
from engine_process import EngineProcess, start_engine
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from served_engine import wait_for_health

from protoserve.v1 import inference_pb2, inference_pb2_grpc

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUERY = "what is the capital of france"
DOCUMENTS = [
    "bananas are yellow",
    "paris is the capital and largest city of france",
    "berlin is the capital of germany",
    "the quick brown fox",
]


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bert_classifier(tmp_path_factory.mktemp("ce"), num_labels=1)


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, cross_encoder_dir: Path) -> Iterator[EngineProcess]:
    handle = start_engine(
        tiny_llama_dir, "--served-model-name", "llama",
        "--embedding-model", str(cross_encoder_dir), "--embedding-served-model-name", "ce",
        role="all",
    )
    try:
        assert handle.http_url is not None
        wait_for_health(handle.http_url, handle.process, 120.0)
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def expected(cross_encoder_dir: Path) -> list[float]:
    st = pytest.importorskip("sentence_transformers")
    reference = st.CrossEncoder(str(cross_encoder_dir), device="cpu")
    return [float(s) for s in reference.predict([(QUERY, d) for d in DOCUMENTS])]


def _post(server: EngineProcess, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.http_url}{path}", json=body, timeout=60)


def test_score_routes_equal_cross_encoder(server: EngineProcess, expected: list[float]) -> None:
    for path in ("/score", "/v1/score"):
        reply = _post(server, path, {"model": "ce", "text_1": QUERY, "text_2": DOCUMENTS})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["object"] == "list" and body["model"] == "ce"
        assert body["id"].startswith("score-")
        assert [d["index"] for d in body["data"]] == list(range(len(DOCUMENTS)))
        assert {d["object"] for d in body["data"]} == {"score"}
        assert [d["score"] for d in body["data"]] == pytest.approx(expected, abs=1e-5)
        assert body["usage"]["prompt_tokens"] > 0
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"]
    # Lists of equal length pair up; unnamed calls go to the pooling model.
    zipped = _post(server, "/v1/score", {"text_1": [QUERY] * 2, "text_2": DOCUMENTS[:2]}).json()
    assert zipped["model"] == "ce"
    assert [d["score"] for d in zipped["data"]] == pytest.approx(expected[:2], abs=1e-5)


def test_rerank_routes_rank_by_cross_encoder(server: EngineProcess,
                                             expected: list[float]) -> None:
    order = sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])
    for path in ("/rerank", "/v1/rerank"):
        body = _post(server, path, {"model": "ce", "query": QUERY, "documents": DOCUMENTS,
                                    "top_n": 2}).json()
        assert body["model"] == "ce" and body["usage"]["total_tokens"] > 0
        assert [r["index"] for r in body["results"]] == order[:2]
        for result in body["results"]:
            assert result["relevance_score"] == pytest.approx(expected[result["index"]], abs=1e-5)
            assert result["document"] == {"text": DOCUMENTS[result["index"]]}
    v2 = _post(server, "/v2/rerank", {"model": "ce", "query": QUERY,
                                      "documents": DOCUMENTS}).json()
    assert [r["index"] for r in v2["results"]] == order
    assert all(set(r) == {"index", "relevance_score"} for r in v2["results"])
    assert v2["meta"]["api_version"] == {"version": "2"}
    assert v2["meta"]["tokens"]["input_tokens"] > 0


def test_pooling_returns_the_raw_logit(server: EngineProcess, cross_encoder_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    body = _post(server, "/pooling", {"model": "ce", "input": [QUERY, DOCUMENTS[1]]}).json()
    assert body["id"].startswith("pool-") and {d["object"] for d in body["data"]} == {"pooling"}
    tokenizer = AutoTokenizer.from_pretrained(str(cross_encoder_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(cross_encoder_dir)).eval()
    with torch.no_grad():
        logits = model(**tokenizer([QUERY, DOCUMENTS[1]], padding=True,
                                   return_tensors="pt")).logits
    assert [d["data"][0] for d in body["data"]] == pytest.approx(logits[:, 0].tolist(), abs=1e-5)
    assert all(len(d["data"]) == 1 for d in body["data"])


def test_bad_requests_name_the_field(server: EngineProcess) -> None:
    refused = _post(server, "/v1/score", {"model": "llama", "text_1": QUERY, "text_2": "x"})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "model" and error["code"] == "TASK_NOT_SUPPORTED"
    assert "generative" in error["message"]
    mismatched = _post(server, "/v1/score", {"model": "ce", "text_1": ["a", "b"],
                                             "text_2": ["c", "d", "e"]})
    assert mismatched.status_code == 400 and mismatched.json()["error"]["param"] == "text_1"
    empty = _post(server, "/rerank", {"model": "ce", "query": QUERY, "documents": []})
    assert empty.status_code == 400 and "documents" in empty.text
    # The server keeps serving.
    assert _post(server, "/score", {"model": "ce", "text_1": "a", "text_2": "b"}).status_code \
        == 200


def test_grpc_score(server: EngineProcess, expected: list[float]) -> None:
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        reply = stub.Score(inference_pb2.ScoreRequest(
            model="ce", text_1=[QUERY], text_2=DOCUMENTS), timeout=60)
        assert [s.index for s in reply.scores] == list(range(len(DOCUMENTS)))
        assert [s.score for s in reply.scores] == pytest.approx(expected, abs=1e-5)
        assert reply.usage.prompt_tokens > 0
        with pytest.raises(grpc.RpcError) as info:
            stub.Score(inference_pb2.ScoreRequest(model="llama", text_1=["a"], text_2=["b"]),
                       timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _bad_fields(info.value) == ["model"]
        with pytest.raises(grpc.RpcError) as info:
            stub.Score(inference_pb2.ScoreRequest(model="ce", text_1=["a"]), timeout=60)
        assert _bad_fields(info.value) == ["text_2"]


def _bad_fields(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)
    fields = []
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields += [v.field for v in bad_request.field_violations]
    return fields
