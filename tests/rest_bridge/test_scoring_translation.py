"""Rerank bodies from a Score reply: most relevant first, ties in document order, top_n, and
the Jina/Cohere v1 vs Cohere v2 document rules; a negative top_n names the field."""
from __future__ import annotations

import pytest

from protoserve.v1 import inference_pb2
from rest_bridge.errors import BridgeError
from rest_bridge.openai_schemas.scoring import RerankRequest
from rest_bridge.translate.scoring import (
    cohere_v2_rerank_body,
    rerank_body,
    rerank_request_from,
)

DOCUMENTS = ["d0", "d1", "d2", "d3"]
SCORES = [0.25, 0.75, 0.25, 0.5]


def reply() -> inference_pb2.ScoreResponse:
    response = inference_pb2.ScoreResponse(request_id="r")
    for index, score in enumerate(SCORES):
        response.scores.add(index=index, score=score)
    response.usage.prompt_tokens = 17
    return response


def test_v1_ranks_and_returns_documents() -> None:
    body = RerankRequest(query="q", documents=DOCUMENTS, top_n=3)
    out = rerank_body(reply(), body, response_id="rerank-r", model="m")
    assert [r["index"] for r in out["results"]] == [1, 3, 0]
    assert [r["relevance_score"] for r in out["results"]] == [0.75, 0.5, 0.25]
    assert [r["document"]["text"] for r in out["results"]] == ["d1", "d3", "d0"]
    assert out["usage"] == {"total_tokens": 17} and out["model"] == "m"
    unranked = rerank_body(reply(), RerankRequest(query="q", documents=DOCUMENTS,
                                                  return_documents=False),
                           response_id="x", model="m")
    assert [r["index"] for r in unranked["results"]] == [1, 3, 0, 2]
    assert all("document" not in r for r in unranked["results"])


def test_v2_leaves_documents_out_unless_asked() -> None:
    out = cohere_v2_rerank_body(reply(), RerankRequest(query="q", documents=DOCUMENTS),
                                response_id="rerank-r")
    assert [set(r) for r in out["results"]] == [{"index", "relevance_score"}] * 4
    assert out["meta"]["tokens"] == {"input_tokens": 17, "output_tokens": 0}
    asked = cohere_v2_rerank_body(
        reply(), RerankRequest(query="q", documents=DOCUMENTS, return_documents=True, top_n=1),
        response_id="rerank-r")
    assert asked["results"] == [{"index": 1, "relevance_score": 0.75,
                                 "document": {"text": "d1"}}]


def test_rerank_is_score_with_the_query_as_text_1() -> None:
    pb = rerank_request_from(RerankRequest(query="q", documents=DOCUMENTS), "r")
    assert list(pb.text_1) == ["q"] and list(pb.text_2) == DOCUMENTS
    with pytest.raises(BridgeError) as refused:
        rerank_request_from(RerankRequest(query="q", documents=DOCUMENTS, top_n=-1), "r")
    assert refused.value.param == "top_n"
