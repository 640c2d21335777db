"""The scheduler's side of speculative decoding: which requests get draft tokens this step,
how many, and when a request stops getting them (back-off); plus the acceptance counters.

Eligible: a running request at its decode point (one token to compute) whose output does not
need per-token logprobs: logprobs, prompt_logprobs, best_of ranking and beam search (which
ranks by logprobs) are excluded, since a draft position's distribution is not reported.
Everything else speculates: greedy and sampled, seeded, penalties, logit bias, token masks
and guided decoding (the verifier masks each draft position with the grammar's state there).

How many drafts (cost-aware): each request keeps a decayed count of its draft tokens
accepted and of its acceptance trials (a verification that keeps n of k drafts is n
successes and, when n < k, one failure), whose ratio estimates the chance p that its next
draft is accepted; draft j is accepted with about p^j. The step cost model
(engine.spec_decode.cost_model, measured as the engine runs) says what acceptance chance a
draft row needs in a step of N requests to beat plain decoding, theta(N); the request gets
the drafts with p^j > theta(N), so a batch-1 step speculates on weak evidence while a large
batch, whose extra rows cost real time, speculates only on text that keeps being predicted.
Seeded sampled requests use the prior's theta(1) instead: their random draws follow their
drafts, and their output must not depend on the batch or on measured times.

Back-off: a request whose estimate falls below `acceptance_floor`, or below theta(N) for
even its first draft, proposes nothing for a cool-down of steps that doubles each time it
trips (16, 32, ... 512), then starts again from the prior estimate; so text the proposer does
not predict pays only the lookup and a few verifications (about 5% of its steps over 128
tokens).
The proposer is the method's (`make_proposer`): n-gram lookup, or a draft model or EAGLE
head (which reads the target runner's hidden states) imported only when configured, so this
module stays torch-free, as the scheduler does.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from engine.core.request import Request
from engine.spec_decode.config import SpeculativeConfig
from engine.spec_decode.cost_model import StepCostModel
from engine.spec_decode.eligibility import params_speculate
from engine.spec_decode.ngram import NgramProposer

# Weight of the earlier verifications in a request's acceptance counts, per verification.
_DECAY = 0.5
# A new request starts at p = 1 / 1.5: one verification with nothing accepted takes it to
# 0.33, a second to 0.14 (below the default floor), while one good verification keeps it.
_PRIOR_ACCEPTED, _PRIOR_TRIALS = 1.0, 1.5
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
    accepted: float = _PRIOR_ACCEPTED  # decayed count of accepted drafts
    trials: float = _PRIOR_TRIALS  # decayed count of acceptance trials
    skip: int = 0  # proposals still to skip
    cooldown: int = _FIRST_COOLDOWN

    @property
    def acceptance(self) -> float:
        """The estimated chance that the request's next draft is accepted."""
        return self.accepted / self.trials

    def trip(self) -> None:
        self.skip = self.cooldown
        self.cooldown = min(2 * self.cooldown, _MAX_COOLDOWN)
        # After the pause the request gets a fresh chance, not the old estimate.
        self.accepted, self.trials = _PRIOR_ACCEPTED, _PRIOR_TRIALS


def drafts_worth_verifying(acceptance: float, threshold: float, limit: int) -> int:
    """How many drafts (at most `limit`) have an acceptance chance acceptance^j above
    `threshold`: the j-th draft is verified only if the ones before it were accepted."""
    count, chance = 0, acceptance
    while count < limit and chance > threshold:
        count += 1
        chance *= acceptance
    return count


class Proposer(Protocol):
    def propose(self, request_id: str, token_ids: Sequence[int], num_tokens: int) -> list[int]:
        """Up to `num_tokens` tokens likely to follow `token_ids` (deterministic)."""
        ...

    def forget(self, request_id: str) -> None: ...


def make_proposer(config: SpeculativeConfig, target: object | None = None) -> Proposer:
    """`target`: the engine's runner, whose hidden states an EAGLE head reads."""
    if config.method == "eagle":
        if target is None:
            raise ValueError("speculative config method 'eagle' needs the target's runner")
        from engine.spec_decode.eagle import build_eagle_proposer

        return build_eagle_proposer(config, target)
    if config.method == "draft_model":
        assert config.model is not None  # the config refuses draft_model without one
        # Imported only here: torch and the runner stay out of the scheduler's imports.
        from engine.spec_decode.draft_model import DraftModelProposer
        from engine.spec_decode.target import generation_runner

        if target is None:
            return DraftModelProposer(config.model)
        runner = generation_runner(target, "draft_model")
        return DraftModelProposer(config.model, runner.loaded.dtype, runner.device)
    return NgramProposer(config.prompt_lookup_max, config.prompt_lookup_min)


def is_speculation_eligible(request: Request) -> bool:
    return request.pooling_params is None and params_speculate(request.sampling_params)


class SpecDecoder:
    def __init__(self, config: SpeculativeConfig, max_model_len: int,
                 target: object | None = None) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.proposer = make_proposer(config, target)
        self.stats = SpecDecodeStats(accepted_per_pos=[0] * config.num_speculative_tokens)
        self.cost = StepCostModel()
        self._back_off: dict[str, _BackOff] = {}
        # This step's drafts from `prefetch`, by request.
        self._prefetched: dict[str, list[int]] = {}

    def prefetch(self, requests: Sequence[Request], num_requests: int) -> None:
        """With a proposer that batches (draft model, EAGLE head): the drafts of every
        request at its decode point in one call, which `propose` then hands out (cut to the
        step's remaining budget), so N requests cost one batched draft step per token."""
        self._prefetched = {}
        batched = getattr(self.proposer, "propose_batch", None)
        if batched is None:
            return
        wanted: dict[str, tuple[Sequence[int], int]] = {}
        for request in requests:
            if (request.num_tokens - request.num_computed_tokens != 1
                    or not is_speculation_eligible(request)):
                continue
            state = self._back_off.get(request.request_id) or _BackOff()
            if state.skip > 0:
                continue
            limit = self.config.num_speculative_tokens + 1
            if count := self._num_drafts(request, state, limit, num_requests):
                wanted[request.request_id] = (request.all_token_ids, count)
        if wanted:
            self._prefetched = batched(wanted)

    def propose(self, request: Request, budget: int, num_requests: int = 1) -> list[int]:
        """Draft tokens to verify after the request's newest token this step ([] for none).
        `budget`: tokens the step can still take, the newest token included; `num_requests`:
        about how many requests the step decodes (the cost model's N)."""
        if not is_speculation_eligible(request):
            return []
        state = self._back_off.get(request.request_id)
        if state is None:
            state = self._back_off[request.request_id] = _BackOff()
        if state.skip > 0:
            state.skip -= 1
            return []
        count = self._num_drafts(request, state, budget, num_requests)
        if count < 0:
            state.trip()
        if count <= 0:
            return []
        drafts = self._prefetched.pop(request.request_id, None)
        if drafts is None:
            drafts = self.proposer.propose(request.request_id, request.all_token_ids, count)
        return drafts[:count]

    def _num_drafts(self, request: Request, state: _BackOff, budget: int,
                    num_requests: int) -> int:
        """How many drafts the request gets: 0 for none this step, -1 for none and a
        back-off (its acceptance is too low to be worth any)."""
        # A draft can only be kept while the request may still grow: never past max_tokens
        # (the target's own token follows the drafts) nor the context window.
        room = min(
            self.config.num_speculative_tokens,
            budget - 1,
            request.max_tokens - request.num_output_tokens - 1,
            self.max_model_len - request.num_tokens - 1,
        )
        if room <= 0:
            return 0
        acceptance = state.acceptance
        params = request.sampling_params
        if params.seed is not None and not params.is_greedy:
            # A seeded request's random draws follow its drafts, so its draft counts may
            # depend on its own history only, never on the batch or the machine's timing:
            # the same seed must give the same output however it is served.
            threshold = self.cost.prior_threshold
        else:
            threshold = self.cost.draft_threshold(num_requests)
        worth = drafts_worth_verifying(acceptance, threshold, room)
        if worth == 0 or acceptance < self.config.acceptance_floor:
            return -1
        return worth

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
        failed = 1.0 if num_accepted < num_drafts else 0.0
        state.accepted = _DECAY * state.accepted + num_accepted
        state.trials = _DECAY * state.trials + num_accepted + failed
        if state.acceptance < self.config.acceptance_floor:
            state.trip()

    def forget(self, request_id: str) -> None:
        self.proposer.forget(request_id)
        self._back_off.pop(request_id, None)
