"""protoserve.v1 Score and Classify end to end: check the model can answer, queue one pooling
request per pair / text / input through the engine loop, turn the pooled rows into scores or
label probabilities.

    cross-encoder Score:   pair -> one logit -> sigmoid (or the raw logit, per the model)
    embedding-model Score: text_1, text_2 -> unit embeddings -> cosine = dot product
    Classify:              input -> logits -> softmax (sigmoid for a one-logit head)
"""
from __future__ import annotations

import math

from engine.errors import InvalidRequestError
from engine.frontend.pooling_stream import embedding_of
from engine.frontend.score_input import ScoreInputProcessor, ScoreRequest, score_pairs
from engine.frontend.served_model import Engine
from engine.generation import EmbeddingRequest
from engine.server.admission import EMBED_INPUT_BYTES, EMBED_TOKEN_BYTES, RequestCost
from engine.server.embed_convert import embedding_request_from_pb
from engine.server.request_tracker import PROMPT_BYTES_PER_TOKEN
from protoserve.v1 import inference_pb2


def score_request_from_pb(pb: inference_pb2.ScoreRequest, request_id: str) -> ScoreRequest:
    return ScoreRequest(
        request_id=request_id,
        text_1=tuple(pb.text_1),
        text_2=tuple(pb.text_2),
        truncate_prompt_tokens=(
            pb.truncate_prompt_tokens if pb.HasField("truncate_prompt_tokens") else None),
        priority=pb.priority,
    )


def classify_request_from_pb(
    pb: inference_pb2.ClassifyRequest, request_id: str
) -> EmbeddingRequest:
    """A Classify call is an Embed call whose rows are raw logits (never normalised)."""
    embed = inference_pb2.EmbedRequest(
        request_id=request_id, model=pb.model, inputs=pb.inputs, priority=pb.priority,
        normalize=False)
    if pb.HasField("truncate_prompt_tokens"):
        embed.truncate_prompt_tokens = pb.truncate_prompt_tokens
    if pb.HasField("add_special_tokens"):
        embed.add_special_tokens = pb.add_special_tokens
    return embedding_request_from_pb(embed, request_id)


def score_cost(pb: inference_pb2.ScoreRequest) -> RequestCost:
    """As embed_cost: text bytes bound the tokens each pair (or text) holds."""
    texts = len(pb.text_1) + len(pb.text_2)
    size = sum(len(t.encode()) for t in pb.text_1) + sum(len(t.encode()) for t in pb.text_2)
    return RequestCost({"inputs": texts * EMBED_INPUT_BYTES + size * EMBED_TOKEN_BYTES})


def check_text_bytes(pb: inference_pb2.ScoreRequest, limit: int | None,
                     max_model_len: int) -> None:
    """As Generate's prompts: a text over the byte limit is refused before it is tokenized."""
    if limit is None:
        limit = PROMPT_BYTES_PER_TOKEN * max_model_len
    for field, texts in (("text_1", pb.text_1), ("text_2", pb.text_2)):
        for index, text in enumerate(texts):
            size = len(text.encode())
            if size > limit:
                raise InvalidRequestError(
                    f"{field} {index} is {size} bytes; at most {limit} are accepted "
                    "(--max-prompt-bytes)", field=field)


def check_can_score(engine: Engine) -> None:
    model = engine.model
    if model.task == "generate":
        raise InvalidRequestError(
            f"model {model.names[0]!r} is a generative model; scoring needs a cross-encoder "
            "(sequence classification) or embedding model", field="model",
            reason="TASK_NOT_SUPPORTED")
    if model.labels and len(model.labels) != 1:
        raise InvalidRequestError(
            f"model {model.names[0]!r} classifies into {len(model.labels)} labels; scoring "
            "needs a cross-encoder with one output (use classify)", field="model",
            reason="TASK_NOT_SUPPORTED")


def check_can_classify(engine: Engine) -> None:
    model = engine.model
    if not model.labels:
        kind = "a generative" if model.task == "generate" else "an embedding"
        raise InvalidRequestError(
            f"model {model.names[0]!r} is {kind} model; classify needs a sequence "
            "classification model", field="model", reason="TASK_NOT_SUPPORTED")


async def score(
    engine: Engine, req: ScoreRequest, deadline: float | None
) -> inference_pb2.ScoreResponse:
    check_can_score(engine)
    processor = ScoreInputProcessor(engine.tokenizer, engine.embedding_processor.limits)
    response = inference_pb2.ScoreResponse(request_id=req.request_id)
    if engine.model.labels:
        requests = await engine.loop.off_loop(processor.cross_encoder_requests, req)
        pooled = await engine.loop.embed(req.request_id, requests, deadline)
        identity = engine.model.score_activation == "identity"
        for item in pooled:
            logit = embedding_of(item)[0]
            response.scores.add(index=item.index, score=logit if identity else _sigmoid(logit))
    else:
        requests, texts = await engine.loop.off_loop(processor.embedding_requests, req)
        pooled = await engine.loop.embed(req.request_id, requests, deadline)
        vectors = {texts[item.index]: embedding_of(item) for item in pooled}
        for index, (first, second) in enumerate(score_pairs(req)):
            cosine = sum(a * b for a, b in zip(vectors[first], vectors[second], strict=True))
            response.scores.add(index=index, score=cosine)
    response.usage.prompt_tokens = sum(request.num_prompt_tokens for request in requests)
    return response


async def classify(
    engine: Engine, req: EmbeddingRequest, deadline: float | None
) -> inference_pb2.ClassifyResponse:
    check_can_classify(engine)
    labels = engine.model.labels
    requests = await engine.loop.off_loop(engine.embedding_processor.make_requests, req)
    pooled = await engine.loop.embed(req.request_id, requests, deadline)
    response = inference_pb2.ClassifyResponse(request_id=req.request_id, labels=labels)
    for item in pooled:
        logits = embedding_of(item)
        probs = [_sigmoid(logits[0])] if len(logits) == 1 else _softmax(logits)
        best = max(range(len(probs)), key=probs.__getitem__)
        response.results.add(index=item.index, label=labels[best], probs=probs, logits=logits)
    response.usage.prompt_tokens = sum(request.num_prompt_tokens for request in requests)
    return response


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]
