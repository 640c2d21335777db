"""The engine's view of one request: its tokens, its progress, and its KV blocks.

Progress is one counter, `num_computed_tokens`, against `num_tokens` (prompt + output). Prefill,
chunked prefill, prefix-cache hits and resumption after preemption are all "compute the tokens
in [num_computed_tokens, num_tokens)"; no phase flags.

Ownership: the engine core builds it from a CoreRequest (`EngineCore.add_request`) and it
never leaves the core's thread: the serving side learns about it from RequestOutputs only.
Inside the core, the scheduler owns status and counters; KVCacheManager is the only writer of
`block_ids` and `block_hashes`.
"""
from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from engine.lora.request import LoRARequest
from engine.pooling_params import PoolingParams
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.core.core_request import CoreRequest
    from engine.structured.grammar import Grammar


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Everything above PREEMPTED is finished.
    FINISHED = 3

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"  # the server aborted it (Admin/Abort, shutdown, engine error)
    CANCELLED = "cancelled"  # the client went away
    DEADLINE = "deadline"  # its deadline (gRPC or bridge timeout) expired
    CONSTRAINT = "constraint"  # the output constraint admits no further token


class Request:
    __slots__ = (
        "request_id",
        "prompt_token_ids",
        "all_token_ids",
        "sampling_params",
        "eos_token_ids",
        "max_tokens",
        "arrival_time",
        "priority",
        "cache_salt",
        "status",
        "num_computed_tokens",
        "num_cached_tokens",
        "block_ids",
        "block_tables",
        "block_hashes",
        "finish_reason",
        "stop_token_id",
        "num_preemptions",
        "prompt_logprobs",
        "pooling_params",
        "grammar",
        "first_scheduled_time",
        "deadline",
        "lora",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams,
        *,
        max_tokens: int,
        eos_token_ids: frozenset[int] = frozenset(),
        priority: int = 0,
        cache_salt: str = "",
        arrival_time: float | None = None,
        pooling_params: PoolingParams | None = None,
        deadline: float | None = None,
        grammar: Grammar | None = None,
        lora: LoRARequest | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        # Prompt followed by every generated token; the runner reads it, never writes it.
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.max_tokens = max_tokens  # resolved: never None here
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.priority = priority
        self.cache_salt = cache_salt
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        # Prompt tokens found in the prefix cache at first admission (reported in usage).
        self.num_cached_tokens = 0
        self.block_ids: list[int] = []
        # One block table per KV cache group (engine/kv_cache/groups.py); the first is
        # block_ids itself, so a model with one group has only that.
        self.block_tables: list[list[int]] = [self.block_ids]
        self.block_hashes: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.stop_token_id: int | None = None
        self.num_preemptions = 0
        # Per prompt position (None for the first), filled chunk by chunk when the request
        # asks for prompt_logprobs; handed out with its first output token.
        self.prompt_logprobs: list | None = None
        # Set for embedding requests: computed whole in one step, without KV blocks, and
        # finished with a pooled vector instead of sampled tokens.
        self.pooling_params = pooling_params
        # Guided decoding matcher state (engine.structured.Grammar), built by the core's own
        # grammar compiler from the request's constraint before the request reaches the
        # scheduler. It has accepted exactly the output tokens: preemption keeps it as is,
        # and recompute never feeds it again.
        self.grammar = grammar
        # time.monotonic() when the scheduler first admitted it (its queue wait ends there;
        # kept across preemption). Every RequestOutput carries it to the serving side.
        self.first_scheduled_time: float | None = None
        # time.monotonic() after which it must not start running: the scheduler evicts it
        # from the queue with FinishReason.DEADLINE instead of admitting it. None: no deadline.
        self.deadline = deadline
        # Its LoRA adapter (None: the base model): applied by the runner to its rows, and a
        # key of its prefix-cache blocks, so KV computed under one adapter serves no other.
        self.lora = lora

    @classmethod
    def from_core(cls, request: CoreRequest, grammar: Grammar | None = None) -> Request:
        """The core's own Request for what the serving side sent (EngineCore.add_request)."""
        return cls(
            request.request_id,
            request.prompt_token_ids,
            request.sampling_params,
            max_tokens=request.max_tokens,
            eos_token_ids=request.eos_token_ids,
            priority=request.priority,
            cache_salt=request.cache_salt,
            arrival_time=request.arrival_time,
            pooling_params=request.pooling_params,
            deadline=request.deadline,
            grammar=grammar,
            lora=request.lora,
        )

    @property
    def lora_id(self) -> int:
        """0 for the base model."""
        return 0 if self.lora is None else self.lora.lora_id

    @property
    def is_pooling(self) -> bool:
        return self.pooling_params is not None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids) :]

    def append_output_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens}, blocks={len(self.block_ids)})"
        )
