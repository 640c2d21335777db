"""The scheduler's side of speculative decoding: which requests get draft tokens this step,
how many, and when a request stops getting them (back-off); plus the acceptance counters.

Eligible: a running request at its decode point (one token to compute) whose output does not
need per-token logprobs: logprobs, prompt_logprobs, best_of ranking and beam search (which
ranks by logprobs) are excluded, since a draft position's distribution is not reported.
Everything else speculates: greedy and sampled, seeded, penalties, logit bias, token masks
and guided decoding (the verifier masks each draft position with the grammar's state there).

Back-off: an exponential average of each request's acceptance rate (accepted / proposed);
below `acceptance_floor` the request proposes nothing for a cool-down of steps that doubles
each time it trips (16, 32, ... 512), so text the proposer does not predict pays only the
lookup and a few verifications (about 5% of its steps over 128 tokens).
The proposer is the method's (`make_proposer`): n-gram lookup, or a draft model imported only
when configured, so this module stays torch-free, as the scheduler does.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from engine.core.request import Request
from engine.spec_decode.config import SpeculativeConfig
from engine.spec_decode.ngram import NgramProposer

_EMA_WEIGHT = 0.5
# A new request starts at this average: two verifications with nothing accepted trip the
# back-off (0.5 -> 0.25 -> 0.125), while one good verification keeps it going.
_FIRST_EMA = 0.5
_FIRST_COOLDOWN = 16
_MAX_COOLDOWN = 512


@dataclass(slots=True)
class SpecDecodeStats:
    """Cumulative counters, in the reference's terms: a draft is one verification of one
    request with at least one draft token."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # Index i: drafts whose token at position i was accepted.
    accepted_per_pos: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification: the accepted drafts plus the target's own."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def copy(self) -> SpecDecodeStats:
        return SpecDecodeStats(
            self.num_drafts,
            self.num_draft_tokens,
            self.num_accepted_tokens,
            list(self.accepted_per_pos),
        )


@dataclass(slots=True)
class _BackOff:
    ema: float = _FIRST_EMA
    skip: int = 0  # proposals still to skip
    cooldown: int = _FIRST_COOLDOWN


class Proposer(Protocol):
    def propose(self, request_id: str, token_ids: Sequence[int], num_tokens: int) -> list[int]:
        """Up to `num_tokens` tokens likely to follow `token_ids` (deterministic)."""
        ...

    def forget(self, request_id: str) -> None: ...


def make_proposer(config: SpeculativeConfig) -> Proposer:
    if config.method == "draft_model":
        assert config.model is not None  # the config refuses draft_model without one
        # Imported only here: torch and transformers stay out of the scheduler's imports.
        from engine.spec_decode.draft_model import DraftModelProposer

        return DraftModelProposer(config.model)
    return NgramProposer(config.prompt_lookup_max, config.prompt_lookup_min)


def is_speculation_eligible(request: Request) -> bool:
    params = request.sampling_params
    return (
        request.pooling_params is None
        and params.logprobs is None
        and params.prompt_logprobs is None
        and not params.use_beam_search
        and (params.best_of is None or params.best_of <= params.n)
    )


class SpecDecoder:
    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.proposer = make_proposer(config)
        self.stats = SpecDecodeStats(accepted_per_pos=[0] * config.num_speculative_tokens)
        self._back_off: dict[str, _BackOff] = {}

    def propose(self, request: Request, budget: int) -> list[int]:
        """Draft tokens to verify after the request's newest token this step ([] for none).
        `budget`: tokens the step can still take, the newest token included."""
        if not is_speculation_eligible(request):
            return []
        state = self._back_off.get(request.request_id)
        if state is None:
            state = self._back_off[request.request_id] = _BackOff()
        if state.skip > 0:
            state.skip -= 1
            return []
        # A draft can only be kept while the request may still grow: never past max_tokens
        # (the target's own token follows the drafts) nor the context window.
        room = min(
            self.config.num_speculative_tokens,
            budget - 1,
            request.max_tokens - request.num_output_tokens - 1,
            self.max_model_len - request.num_tokens - 1,
        )
        if room <= 0:
            return []
        return self.proposer.propose(request.request_id, request.all_token_ids, room)

    def record(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        """One verification's outcome: counters, and the request's back-off state."""
        stats = self.stats
        stats.num_drafts += 1
        stats.num_draft_tokens += num_drafts
        stats.num_accepted_tokens += num_accepted
        for position in range(num_accepted):
            stats.accepted_per_pos[position] += 1
        state = self._back_off.get(request_id)
        if state is None:
            return
        state.ema = (1 - _EMA_WEIGHT) * state.ema + _EMA_WEIGHT * num_accepted / num_drafts
        if state.ema < self.config.acceptance_floor:
            state.skip = state.cooldown
            state.cooldown = min(2 * state.cooldown, _MAX_COOLDOWN)
            # After the pause the request gets a fresh chance, not the old average.
            state.ema = _FIRST_EMA

    def forget(self, request_id: str) -> None:
        self.proposer.forget(request_id)
        self._back_off.pop(request_id, None)
