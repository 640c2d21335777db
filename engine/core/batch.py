"""The scheduler -> runner hand-off: which tokens of which requests to compute this step.

The runner lives in the same process, so sequences are passed by reference (no copies):
`token_ids` and `block_ids` alias the request's own lists and are read-only to the runner.

    token_ids:  [ t0 t1 ... t(start-1) | t(start) ... t(start+num_tokens-1) | ... ]
                  already in the KV cache   computed this step (positions start..)

When `start + num_tokens == len(token_ids)` the step reaches the newest token, so the runner
samples the next one (`sample=True`); a chunk of a longer prompt does not sample.

Speculative decoding: a request at its decode point may carry `draft_token_ids`, proposed
tokens computed after its newest one in the same step (positions len(token_ids) ..):
`num_tokens` counts them too, and the runner verifies them (engine.spec_decode.rejection).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING


from engine.lora.request import LoRARequest
from engine.pooling_params import PoolingParams
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.structured.grammar import Grammar


@dataclass(slots=True)
class ScheduledRequest:
    request_id: str
    token_ids: Sequence[int]
    start: int
    num_tokens: int
    block_ids: Sequence[int]
    sample: bool
    sampling_params: SamplingParams
    num_prompt_tokens: int
    # The request's EOS ids: min_tokens masks them until enough output exists.
    eos_token_ids: frozenset[int] = frozenset()
    # Guided decoding state (the request's own object): the sampler reads its allowed-token
    # mask; only the scheduler advances it.
    grammar: Grammar | None = None
    # The adapter its rows run with (None: the base model).
    lora: LoRARequest | None = None
    # Draft tokens to verify after the newest token (speculative decoding); not in token_ids.
    draft_token_ids: Sequence[int] = ()
    # One block table per KV cache group, the first being block_ids (engine/kv_cache/
    # groups.py); empty or shorter: the missing groups use block_ids.
    block_tables: Sequence[Sequence[int]] = ()

    @property
    def num_output_tokens(self) -> int:
        """Output tokens before this step's sample."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_decode(self) -> bool:
        """One new token on top of a cached context: served by the decode attention path."""
        return self.num_tokens == 1


@dataclass(frozen=True, slots=True)
class ScheduledPooling:
    """One embedding request: all of `token_ids` run in one forward, then pooled."""

    request_id: str
    token_ids: Sequence[int]
    params: PoolingParams


@dataclass(slots=True)
class ScheduledBatch:
    requests: list[ScheduledRequest]
    num_scheduled_tokens: int
    # Requests that finished or were aborted since the previous batch: the runner drops any
    # per-request state it keeps for them (e.g. seeded RNG generators).
    finished_request_ids: list[str] = field(default_factory=list)
    # Requests preempted since the previous batch: their sampler state must survive (they
    # resume later with identical output), so the runner keeps it.
    preempted_request_ids: list[str] = field(default_factory=list)
    # Embedding requests: each computed whole this step (no KV cache) and pooled.
    pooling: list[ScheduledPooling] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.requests and not self.pooling
