"""Cost-aware speculation: the step cost model's fit from step times (a known linear cost,
fed as observations), the acceptance threshold it sets per batch size, and the proposer's
decision per request (how many drafts, when to back off) for predictable and unpredictable
text at batch 1 and at a large batch."""
from __future__ import annotations

import pytest

from engine.core.batch import ScheduledRequest
from engine.core.request import Request
from engine.sampling_params import SamplingParams
from engine.spec_decode.config import SpeculativeConfig
from engine.spec_decode.cost_model import PRIOR_ROW_COST, StepCostModel
from engine.spec_decode.proposals import SpecDecoder, drafts_worth_verifying

PARAMS = SamplingParams(temperature=0.0, max_tokens=1000)


def _rows(num_requests: int, drafts_each: int) -> list[ScheduledRequest]:
    return [
        ScheduledRequest(f"r{i}", [1, 2, 3], 2, 1 + drafts_each, [0], True, PARAMS, 2,
                         draft_token_ids=[5] * drafts_each)
        for i in range(num_requests)
    ]


def _feed(model: StepCostModel, fixed: float, per_row: float) -> None:
    for requests, drafts in ((1, 0), (1, 4), (8, 0), (8, 4), (4, 2)):
        rows = requests * (1 + drafts)
        for _ in range(3):
            model.observe(_rows(requests, drafts), fixed + per_row * rows)


def test_cost_model_fits_the_per_row_cost_of_decode_steps() -> None:
    model = StepCostModel()
    assert model.row_cost == PRIOR_ROW_COST  # nothing measured yet
    model.observe(_rows(2, 0), 0.011)
    assert model.row_cost == PRIOR_ROW_COST  # one row count is no slope
    _feed(model, fixed=0.010, per_row=0.0005)
    assert model.row_cost == pytest.approx(0.05)
    # The threshold a draft must pass: r N / (1 + r N).
    assert model.draft_threshold(1) == pytest.approx(0.05 / 1.05)
    assert model.draft_threshold(8) == pytest.approx(0.4 / 1.4)


def test_prefill_steps_and_implausible_fits_leave_the_estimate_alone() -> None:
    model = StepCostModel()
    prefill = ScheduledRequest("p", [1] * 50, 0, 50, [0, 1, 2, 3], True, PARAMS, 50)
    model.observe([prefill], 0.5)
    model.observe(_rows(1, 0), 0.01)
    assert model.row_cost == PRIOR_ROW_COST  # the prefill step was not kept
    # A busy machine made the bigger steps look faster: keep the prior.
    model.observe(_rows(8, 4), 0.005)
    assert model.row_cost == PRIOR_ROW_COST


def test_drafts_worth_verifying_stops_where_the_chain_gets_too_unlikely() -> None:
    assert drafts_worth_verifying(0.9, 0.03, 4) == 4
    assert drafts_worth_verifying(0.9, 0.75, 4) == 2  # 0.9, 0.81 pass; 0.729 does not
    assert drafts_worth_verifying(0.5, 0.6, 4) == 0
    assert drafts_worth_verifying(1.0, 0.99, 3) == 3


class _FixedProposer:
    """Always proposes as many copies of token 7 as allowed (the lookup is not under test)."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def propose(self, request_id: str, token_ids: list[int], num_tokens: int) -> list[int]:
        self.asked.append(num_tokens)
        return [7] * num_tokens

    def forget(self, request_id: str) -> None:
        pass


def _decoder(row_cost: float) -> tuple[SpecDecoder, _FixedProposer]:
    decoder = SpecDecoder(SpeculativeConfig("ngram", 4), max_model_len=4096)
    proposer = _FixedProposer()
    decoder.proposer = proposer
    decoder.cost = StepCostModel(prior_row_cost=row_cost)
    return decoder, proposer


def _request(name: str) -> Request:
    return Request(name, [1, 2, 3, 4], PARAMS, max_tokens=1000)


def _run(decoder: SpecDecoder, request: Request, num_requests: int, accept: float,
         steps: int) -> int:
    """`steps` scheduling rounds where a fraction `accept` of each draft run is kept; returns
    how many rounds verified drafts."""
    verified = 0
    for _ in range(steps):
        drafts = decoder.propose(request, budget=64, num_requests=num_requests)
        if drafts:
            verified += 1
            decoder.record(request.request_id, len(drafts), int(accept * len(drafts)))
    return verified


def test_predictable_text_speculates_fully_at_batch_1_and_at_batch_8() -> None:
    decoder, proposer = _decoder(row_cost=0.03)
    assert _run(decoder, _request("a"), num_requests=1, accept=1.0, steps=20) == 20
    assert _run(decoder, _request("b"), num_requests=8, accept=1.0, steps=20) == 20
    assert set(proposer.asked) == {4}


def test_unpredictable_text_backs_off_after_few_verifications() -> None:
    decoder, _ = _decoder(row_cost=0.03)
    for num_requests in (1, 8):
        verified = _run(decoder, _request(f"r{num_requests}"), num_requests, accept=0.0,
                        steps=200)
        # Cool-downs of 16, 32, 64, 128 steps: a handful of verifications in 200 steps.
        assert 0 < verified <= 12, (num_requests, verified)


def test_a_large_batch_verifies_fewer_drafts_of_half_predictable_text() -> None:
    """Half of each draft run accepted (estimate ~0.67): at batch 1 every draft pays; in a
    step of 32 requests with costly rows (r = 0.05, threshold 0.62) at most the first one
    does, and once it fails too the request backs off."""
    small, small_proposer = _decoder(row_cost=0.05)
    _run(small, _request("a"), num_requests=1, accept=0.5, steps=30)
    large, large_proposer = _decoder(row_cost=0.05)
    _run(large, _request("a"), num_requests=32, accept=0.5, steps=30)
    small_asked, large_asked = small_proposer.asked, large_proposer.asked
    assert max(small_asked[5:]) == 4
    assert max(large_asked) <= 2 and sum(large_asked) < sum(small_asked) / 4


def test_seeded_sampling_drafts_do_not_depend_on_the_batch_or_timing() -> None:
    """A seeded sampled request's draws follow its drafts: alone, or in a step of 32 with a
    measured costly row, it is asked for the same draft counts."""
    seeded = SamplingParams(temperature=1.0, seed=3, max_tokens=1000)
    asked = []
    for num_requests, row_cost in ((1, 0.03), (32, 0.5)):
        decoder, proposer = _decoder(row_cost=0.03)
        _feed(decoder.cost, fixed=0.010, per_row=0.010 * row_cost)
        request = Request("s", [1, 2, 3, 4], seeded, max_tokens=1000)
        _run(decoder, request, num_requests, accept=0.5, steps=30)
        asked.append(proposer.asked)
    assert asked[0] == asked[1] and asked[0]
