"""The engine loop's API types: what a server submits (generation and embedding requests), and
the events and results it gets back.

Plain data, no torch and no protobuf: server/proto_convert.py maps these to and from the wire.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.lora.request import LoRARequest
from engine.pooling_params import PoolingParams
from engine.core.request import FinishReason
from engine.sampling_params import SamplingParams
from engine.structured.constraint import OutputConstraint



@dataclass(frozen=True, slots=True)
class ChatPrompt:
    messages: list[dict[str, Any]]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    documents: list[dict[str, Any]] | None = None


# Exactly one of text / token_ids / chat.
@dataclass(frozen=True, slots=True)
class PromptInput:
    text: str | None = None
    token_ids: list[int] | None = None
    chat: ChatPrompt | None = None


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    request_id: str
    prompt: PromptInput
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    # None: True for text prompts, False for chat (the template emits BOS itself).
    add_special_tokens: bool | None = None
    priority: int = 0
    cache_salt: str = ""
    return_text: bool = True
    # Guided decoding: what every choice's output must match (compiled off the step thread).
    constraint: OutputConstraint | None = None
    # One step of a beam search (beam_search_driver.py): its top-K logprobs rank beams and are
    # not bounded by --max-logprobs. Servers never set it from a client's request.
    beam_expansion: bool = False
    # The LoRA adapter the request's model name selected (None: the base model).
    lora: LoRARequest | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    # 1 = the most likely token.
    rank: int
    # The token's text (decoded on its own; special tokens kept).
    token: str


@dataclass(frozen=True, slots=True)
class PositionLogprobs:
    """The chosen token at one position and the most likely alternatives, best first."""

    chosen: TokenLogprob
    top: list[TokenLogprob]


@dataclass(frozen=True, slots=True)
class GenerationStarted:
    request_id: str
    prompt_token_ids: list[int]
    prompt_text: str | None
    num_cached_tokens: int
    # One entry per prompt token (None for the first), when prompt_logprobs was asked.
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    # time.monotonic() when the scheduler first admitted it: the end of its queue wait
    # (request metrics and traces split its latency there). None when unknown.
    scheduled_at: float | None = None
    # The output token limit after resolution (the request's max_tokens, or what remains of
    # the context after the prompt).
    max_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class GenerationDelta:
    index: int
    token_ids: list[int]
    text: str
    # One entry per token in token_ids, when logprobs was asked.
    logprobs: list[PositionLogprobs] | None = None
    # Only on a choice's first delta, when prompt_logprobs was asked: the engine loop moves
    # it into GenerationStarted.
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    # These tokens ended the choice: its GenerationFinished comes next, so a streaming client
    # can send the finish with this delta instead of waiting for another event.
    last: bool = False


@dataclass(frozen=True, slots=True)
class GenerationFinished:
    index: int
    reason: FinishReason
    num_output_tokens: int
    stop_token_id: int | None = None
    stop_string: str | None = None
    # Human-readable detail (e.g. why the output constraint failed).
    message: str | None = None


GenerationEvent = GenerationStarted | GenerationDelta | GenerationFinished


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """One Embed call: a batch of inputs answered in order, all with the same parameters."""

    request_id: str
    inputs: tuple[PromptInput, ...]
    params: PoolingParams = PoolingParams()
    # None: keep the whole prompt. Otherwise keep only its last N tokens.
    truncate_prompt_tokens: int | None = None
    # None: True for text inputs, False for chat (the template writes its own specials).
    add_special_tokens: bool | None = None
    priority: int = 0


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    index: int
    values: list[float]
    num_prompt_tokens: int
