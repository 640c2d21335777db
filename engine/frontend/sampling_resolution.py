"""Checks and resolution of SamplingParams that need the tokenizer or the server's limits,
run on the asyncio side once per request (SamplingParams.validate, run where the request
entered the engine, covers the rest)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """What the served model and the server's flags allow a request."""

    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    # Tokens the whole KV cache can hold: a prompt beyond it can never run.
    kv_capacity_tokens: int
    # Server limit on logprobs / prompt_logprobs (--max-logprobs).
    max_logprobs: int = 20


# The fields that ask for logprobs returned to the client.
LOGPROBS_FIELDS = ("logprobs", "prompt_logprobs")


def check_logprobs_limit(
    params: SamplingParams, max_logprobs: int, names: tuple[str, ...] = LOGPROBS_FIELDS
) -> None:
    """The client-facing --max-logprobs limit on the logprobs a request returns."""
    for name in names:
        value = getattr(params, name)
        if value is not None and value > max_logprobs:
            raise InvalidRequestError(
                f"{name} ({value}) exceeds the server limit of {max_logprobs} (--max-logprobs)",
                field=name,
            )


def resolve_sampling_params(
    params: SamplingParams, tokenizer: Tokenizer | None, limits: ModelLimits, *,
    beam_expansion: bool = False,
) -> SamplingParams:
    """`params` checked against the model and server limits, with bad_words tokenized.

    A beam expansion's `logprobs` rank beams inside the server (their count follows the beam
    width) and never reach a client as such: --max-logprobs does not bound them. The beam
    search driver checks the client's own logprobs against it.
    """
    check_logprobs_limit(
        params, limits.max_logprobs, ("prompt_logprobs",) if beam_expansion else LOGPROBS_FIELDS
    )
    if params.use_beam_search:
        # Beam search is a driver over one-token requests (engine/frontend/beam_search_driver.py); a
        # request that reaches the engine with it set skipped that driver.
        raise InvalidRequestError(
            "use_beam_search requests must go through the beam search driver",
            field="use_beam_search",
        )
    vocab_size = limits.vocab_size
    _check_in_vocab(params.logit_bias, "logit_bias", vocab_size)
    _check_in_vocab(params.allowed_token_ids or (), "allowed_token_ids", vocab_size)
    if params.bad_words:
        if tokenizer is None:  # the offline LLM on a checkpoint without a tokenizer
            raise InvalidRequestError("bad_words needs the model's tokenizer, and it has none",
                                      field="bad_words")
        params = replace(params, bad_words_token_ids=bad_words_token_ids(params.bad_words, tokenizer))
    return params


def _check_in_vocab(token_ids: object, field: str, vocab_size: int) -> None:
    for token_id in token_ids:  # type: ignore[attr-defined]
        if not 0 <= token_id < vocab_size:
            raise InvalidRequestError(
                f"{field} has token id {token_id}, outside the vocabulary [0, {vocab_size})",
                field=field,
            )


def bad_words_token_ids(words: tuple[str, ...], tokenizer: Tokenizer) -> tuple[tuple[int, ...], ...]:
    """Each word as it would appear at the start of the text and after a space.

    The spaced form is kept only when the space makes a different first token with the same
    number of tokens (a genuinely separate spelling, not the same tokens behind a space token).
    """
    sequences: list[tuple[int, ...]] = []
    for word in words:
        bare = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        if bare:
            sequences.append(bare)
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        if spaced and bare and spaced[0] != bare[0] and len(spaced) == len(bare):
            sequences.append(spaced)
    return tuple(sequences)
