"""Typed hand-offs back up the stack: runner -> scheduler, and engine core -> engine loop."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.core.request import FinishReason
from engine.errors import EngineError


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Log-probabilities at one position: the chosen (sampled or prompt) token with its rank
    (1 = most likely) and the `len(top_token_ids)` most likely tokens, best first."""

    token_id: int
    logprob: float
    rank: int
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass(slots=True)
class ModelRunnerOutput:
    """One sampled token per scheduled request with `sample=True`, in batch order."""

    request_ids: list[str]
    sampled_token_ids: list[int]
    # Aligned with `sampled_token_ids`; None for rows that did not ask (None: no row asked).
    logprobs: list[TokenLogprobs | None] | None = None
    # request_id -> (first prompt position covered, entries for consecutive prompt tokens):
    # the prompt positions this step's prefill chunk scored, for requests that asked.
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    # request_id -> pooled vector of each embedding request of the batch.
    embeddings: dict[str, list[float]] = field(default_factory=dict)
    # request_id -> how many of its draft tokens were accepted, for requests that had drafts:
    # those drafts come before its entry in `sampled_token_ids` (the target's own token).
    num_accepted_drafts: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request (engine core -> engine loop)."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None
    num_prompt_tokens: int = 0
    # Prompt tokens found in the prefix cache at first admission, and time.monotonic() of
    # that admission: on every output, so the serving side needs no view of the core's Request.
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    # One entry per new token, when the request asked for logprobs.
    logprobs: list[TokenLogprobs] | None = None
    # One entry per prompt token (None for the first), on the request's first output only.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # The pooled vector of a finished embedding request.
    embedding: list[float] | None = None
    # Human-readable detail of the finish (e.g. why the output constraint failed).
    finish_message: str | None = None
    # The core refused the request before running it (its output constraint did not
    # compile): the serving side raises this instead of starting the stream. Engine errors
    # pickle with their kind, field and reason, so it crosses the process boundary as it is.
    error: EngineError | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
