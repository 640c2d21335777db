"""Scoring routes' JSON <-> protoserve.v1 Score / Classify / Embed messages. Rerank is Score
with the query as the one text_1, its results sorted by relevance."""
from __future__ import annotations

from typing import Any

from protoserve.v1 import inference_pb2
from rest_bridge.openai_schemas.scoring import (
    ClassifyRequest,
    PoolingRequest,
    RerankRequest,
    ScoreRequest,
)
from rest_bridge.errors import invalid_request
from rest_bridge.translate.embedding import encode_base64

# Engine field names -> the names each route's clients sent.
SCORE_ALIASES: dict[str, str] = {}
RERANK_ALIASES = {"text_1": "query", "text_2": "documents"}
INPUT_ALIASES = {"inputs": "input"}


def _texts(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def score_request_from(body: ScoreRequest, request_id: str) -> inference_pb2.ScoreRequest:
    pb = inference_pb2.ScoreRequest(
        request_id=request_id, model=body.model or "", text_1=_texts(body.text_1),
        text_2=_texts(body.text_2), priority=body.priority or 0)
    if body.truncate_prompt_tokens is not None:
        pb.truncate_prompt_tokens = body.truncate_prompt_tokens
    return pb


def rerank_request_from(body: RerankRequest, request_id: str) -> inference_pb2.ScoreRequest:
    if body.top_n is not None and body.top_n < 0:
        raise invalid_request(f"top_n must be at least 0, got {body.top_n}", param="top_n")
    pb = inference_pb2.ScoreRequest(
        request_id=request_id, model=body.model or "", text_1=[body.query],
        text_2=list(body.documents), priority=body.priority or 0)
    if body.truncate_prompt_tokens is not None:
        pb.truncate_prompt_tokens = body.truncate_prompt_tokens
    return pb


def classify_request_from(
    body: ClassifyRequest, request_id: str
) -> inference_pb2.ClassifyRequest:
    pb = inference_pb2.ClassifyRequest(
        request_id=request_id, model=body.model or "", priority=body.priority or 0)
    for text in _texts(body.input):
        pb.inputs.add().text = text
    if body.truncate_prompt_tokens is not None:
        pb.truncate_prompt_tokens = body.truncate_prompt_tokens
    if body.add_special_tokens is not None:
        pb.add_special_tokens = body.add_special_tokens
    return pb


def pooling_request_from(body: PoolingRequest, request_id: str) -> inference_pb2.EmbedRequest:
    """Raw pooling is Embed without the normalisation."""
    pb = inference_pb2.EmbedRequest(
        request_id=request_id, model=body.model or "", normalize=False,
        priority=body.priority or 0)
    value = body.input
    items: list[Any] = (
        [value] if isinstance(value, str) or (value and isinstance(value[0], int))
        else list(value))
    for item in items:
        entry = pb.inputs.add()
        if isinstance(item, str):
            entry.text = item
        else:
            entry.token_ids.ids.extend(item)
    if body.truncate_prompt_tokens is not None:
        pb.truncate_prompt_tokens = body.truncate_prompt_tokens
    if body.add_special_tokens is not None:
        pb.add_special_tokens = body.add_special_tokens
    return pb


def _usage(prompt_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens,
            "completion_tokens": 0}


def score_body(reply: inference_pb2.ScoreResponse, *, response_id: str, created: int,
               model: str) -> dict[str, Any]:
    data = [{"index": s.index, "object": "score", "score": s.score}
            for s in sorted(reply.scores, key=lambda s: s.index)]
    return {"id": response_id, "object": "list", "created": created, "model": model,
            "data": data, "usage": _usage(reply.usage.prompt_tokens)}


def ranked_results(reply: inference_pb2.ScoreResponse, documents: list[str], top_n: int | None,
                   return_documents: bool) -> list[dict[str, Any]]:
    """Most relevant first (ties keep document order); the best top_n when it is set."""
    ranked = sorted(reply.scores, key=lambda s: (-s.score, s.index))
    if top_n:
        ranked = ranked[:top_n]
    results = []
    for item in ranked:
        result: dict[str, Any] = {"index": item.index, "relevance_score": item.score}
        if return_documents:
            result["document"] = {"text": documents[item.index]}
        results.append(result)
    return results


def rerank_body(reply: inference_pb2.ScoreResponse, body: RerankRequest, *, response_id: str,
                model: str) -> dict[str, Any]:
    results = ranked_results(reply, list(body.documents), body.top_n,
                             body.return_documents is not False)
    return {"id": response_id, "model": model,
            "usage": {"total_tokens": reply.usage.prompt_tokens}, "results": results}


def cohere_v2_rerank_body(reply: inference_pb2.ScoreResponse, body: RerankRequest, *,
                          response_id: str) -> dict[str, Any]:
    """Cohere v2: results carry no documents unless asked; usage goes in `meta`."""
    results = ranked_results(reply, list(body.documents), body.top_n,
                             bool(body.return_documents))
    return {"id": response_id, "results": results,
            "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1},
                     "tokens": {"input_tokens": reply.usage.prompt_tokens,
                                "output_tokens": 0}}}


def classify_body(reply: inference_pb2.ClassifyResponse, *, response_id: str, created: int,
                  model: str) -> dict[str, Any]:
    data = [{"index": r.index, "label": r.label, "probs": list(r.probs),
             "num_classes": len(r.probs)}
            for r in sorted(reply.results, key=lambda r: r.index)]
    return {"id": response_id, "object": "list", "created": created, "model": model,
            "data": data, "usage": _usage(reply.usage.prompt_tokens)}


def pooling_body(reply: inference_pb2.EmbedResponse, *, response_id: str, created: int,
                 model: str, encoding_format: str) -> dict[str, Any]:
    data = []
    for item in sorted(reply.embeddings, key=lambda e: e.index):
        values = list(item.values)
        data.append({"index": item.index, "object": "pooling",
                     "data": encode_base64(values) if encoding_format == "base64" else values})
    return {"id": response_id, "object": "list", "created": created, "model": model,
            "data": data, "usage": _usage(reply.usage.prompt_tokens)}
