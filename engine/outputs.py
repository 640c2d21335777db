"""Typed hand-offs back up the stack: runner -> scheduler, and engine core -> engine loop."""
from __future__ import annotations

from dataclasses import dataclass

from engine.request import FinishReason


@dataclass(slots=True)
class ModelRunnerOutput:
    """One sampled token per scheduled request with `sample=True`, in batch order."""

    request_ids: list[str]
    sampled_token_ids: list[int]


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request (engine core -> engine loop)."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
