"""The one message that brings a request into the engine core (vLLM's EngineCoreRequest).

The serving side (or the offline LLM) builds it once, with everything resolved (max_tokens,
EOS ids, deadline); it is frozen plain data, so it crosses a thread or a process boundary as
it is (pickled to the engine core process). The core builds its own `Request` from it
(`EngineCore.add_request`) and never hands that back: what the serving side learns about the
request afterwards arrives in `RequestOutput`s.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.lora.request import LoRARequest
from engine.pooling_params import PoolingParams
from engine.sampling_params import SamplingParams
from engine.structured.constraint import OutputConstraint


@dataclass(frozen=True, slots=True)
class CoreRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling_params: SamplingParams
    # Resolved: the output token limit after the prompt (0 for embedding requests).
    max_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    # time.monotonic() when the serving side made it (one clock for every process here).
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0
    cache_salt: str = ""
    # time.monotonic() after which it must not start running (the scheduler evicts it from
    # the queue with FinishReason.DEADLINE). None: no deadline.
    deadline: float | None = None
    # Set for embedding requests: pooled whole in one step, no sampling.
    pooling_params: PoolingParams | None = None
    # What the output must match; the core compiles it into one matcher per request.
    constraint: OutputConstraint | None = None
    # The LoRA adapter it runs with (--enable-lora); None: the base model.
    lora: LoRARequest | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)
