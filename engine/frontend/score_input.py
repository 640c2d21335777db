"""Score requests -> CoreRequests, on the asyncio side like embedding_input.py.

Two ways to score a pair (text_1, text_2), chosen by the model:
- a cross-encoder (sequence classifier) reads the pair as ONE sequence, tokenized as a pair
  by the model's own tokenizer ([CLS] a [SEP] b [SEP] with token types 0/1 for BERT,
  <s> a </s></s> b </s> for RoBERTa), and its one logit is the score;
- an embedding model embeds every distinct text once and the score is their cosine.

Errors name the proto field (`text_1`, `text_2`, `truncate_prompt_tokens`).
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.core.core_request import CoreRequest
from engine.errors import ContextLengthError, InvalidRequestError
from engine.frontend.embedding_input import MAX_INPUTS_PER_REQUEST, EmbeddingLimits
from engine.pooling_params import PoolingParams
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class ScoreRequest:
    request_id: str
    text_1: tuple[str, ...]
    text_2: tuple[str, ...]
    truncate_prompt_tokens: int | None = None
    priority: int = 0


def score_pairs(req: ScoreRequest) -> list[tuple[str, str]]:
    """One text_1 against every text_2, or the two lists zipped (the reference's rule)."""
    if not req.text_1:
        raise InvalidRequestError("text_1 must not be empty", field="text_1")
    if not req.text_2:
        raise InvalidRequestError("text_2 must not be empty", field="text_2")
    if len(req.text_1) == 1:
        pairs = [(req.text_1[0], text) for text in req.text_2]
    elif len(req.text_1) == len(req.text_2):
        pairs = list(zip(req.text_1, req.text_2, strict=True))
    else:
        raise InvalidRequestError(
            f"text_1 has {len(req.text_1)} texts and text_2 {len(req.text_2)}: give one text_1, "
            "or as many as text_2", field="text_1")
    if len(pairs) > MAX_INPUTS_PER_REQUEST:
        raise InvalidRequestError(
            f"at most {MAX_INPUTS_PER_REQUEST} pairs per request, got {len(pairs)}",
            field="text_2")
    for index, (first, second) in enumerate(pairs):
        if not first:
            raise InvalidRequestError(f"text_1 {index} is empty", field="text_1")
        if not second:
            raise InvalidRequestError(f"text_2 {index} is empty", field="text_2")
    return pairs


class ScoreInputProcessor:
    def __init__(self, tokenizer: Tokenizer, limits: EmbeddingLimits) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self._sampling = SamplingParams()

    def cross_encoder_requests(self, req: ScoreRequest) -> list[CoreRequest]:
        """One request per pair, the pair tokenized as one sequence; raw logits back."""
        self._check_truncation(req)
        keep = req.truncate_prompt_tokens
        specials = self.tokenizer.hf.num_special_tokens_to_add(pair=True)
        if keep is not None and keep <= specials:
            # The tokenizer would silently not truncate at all.
            raise InvalidRequestError(
                f"truncate_prompt_tokens must leave room for text beside a pair's {specials} "
                f"special tokens: at least {specials + 1}, got {keep}",
                field="truncate_prompt_tokens")
        requests = []
        for index, (first, second) in enumerate(score_pairs(req)):
            encoded = self.tokenizer.hf(
                first, second, truncation=keep is not None, max_length=keep)
            token_ids = list(encoded["input_ids"])
            token_types = encoded.get("token_type_ids")
            # Tokenizers that mark the second segment (BERT's) tell us where it starts.
            split = token_types.index(1) if token_types and 1 in token_types else None
            self._check_length(len(token_ids), f"pair {index}", "text_2")
            requests.append(self._request(
                req, index, token_ids, PoolingParams(normalize=False, second_segment_start=split)))
        return requests

    def embedding_requests(self, req: ScoreRequest) -> tuple[list[CoreRequest], list[str]]:
        """One normalised embedding request per distinct text (a query scored against many
        documents is embedded once), and the texts in request order."""
        self._check_truncation(req)
        texts = list(dict.fromkeys(text for pair in score_pairs(req) for text in pair))
        requests = []
        for index, text in enumerate(texts):
            token_ids = self.tokenizer.encode(text, add_special_tokens=True)
            if req.truncate_prompt_tokens is not None:
                token_ids = token_ids[-req.truncate_prompt_tokens:]
            self._check_length(len(token_ids), f"text {text[:40]!r}", "text_2")
            requests.append(self._request(req, index, token_ids, PoolingParams(normalize=True)))
        return requests, texts

    def _request(self, req: ScoreRequest, index: int, token_ids: list[int],
                 params: PoolingParams) -> CoreRequest:
        return CoreRequest(
            request_id=f"{req.request_id}-{index}",
            prompt_token_ids=tuple(token_ids),
            sampling_params=self._sampling,
            max_tokens=0,
            priority=req.priority,
            pooling_params=params,
        )

    def _check_truncation(self, req: ScoreRequest) -> None:
        keep = req.truncate_prompt_tokens
        if keep is not None and not 1 <= keep <= self.limits.max_model_len:
            raise InvalidRequestError(
                f"truncate_prompt_tokens must be between 1 and max_model_len "
                f"({self.limits.max_model_len}), got {keep}", field="truncate_prompt_tokens")

    def _check_length(self, num_tokens: int, what: str, field: str) -> None:
        if num_tokens > self.limits.max_model_len:
            raise ContextLengthError(
                f"{what} has {num_tokens} tokens but the model takes at most "
                f"{self.limits.max_model_len}; shorten it or set truncate_prompt_tokens",
                field=field)
