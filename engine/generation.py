"""The engine loop's API types: what a server submits, and the events it streams back.

Plain data, no torch and no protobuf: server/proto_convert.py maps these to and from the wire.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.request import FinishReason
from engine.sampling_params import SamplingParams


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


@dataclass(frozen=True, slots=True)
class GenerationStarted:
    request_id: str
    prompt_token_ids: list[int]
    prompt_text: str | None
    num_cached_tokens: int


@dataclass(frozen=True, slots=True)
class GenerationDelta:
    index: int
    token_ids: list[int]
    text: str


@dataclass(frozen=True, slots=True)
class GenerationFinished:
    index: int
    reason: FinishReason
    num_output_tokens: int
    stop_token_id: int | None = None
    stop_string: str | None = None


GenerationEvent = GenerationStarted | GenerationDelta | GenerationFinished
