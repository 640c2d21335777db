"""Per-request embedding parameters and the embedding API types of the engine loop.

Plain data (no torch, no protobuf), importable from anywhere like sampling_params.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # engine.generation imports engine.request, which imports this module
    from engine.generation import PromptInput

# How a sequence's final hidden states become one vector.
POOLING_TYPES = ("mean", "cls", "last")


@dataclass(frozen=True, slots=True)
class PoolingParams:
    """What the runner does to one pooled vector: keep the first `dimensions` values (all when
    None), then L2-normalise when `normalize`. Truncating before normalising is what
    Matryoshka-trained models expect."""

    normalize: bool = True
    dimensions: int | None = None


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
