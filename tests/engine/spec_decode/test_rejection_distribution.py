"""The draft verifier preserves the target's distribution exactly: over many draws the tokens
it emits (accepted drafts, then a replacement or bonus token) follow sequential sampling from
the target, computed here by hand in plain torch (penalty, temperature, top-k as the reference
defines them), checked with a chi-square goodness-of-fit test."""
from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from engine.core.batch import ScheduledRequest
from engine.sampling.draw import make_generator
from engine.sampling_params import SamplingParams
from engine.spec_decode.rejection import verify_drafts

VOCAB = 6
PROMPT = [0, 1, 2]
DRAFTS = [3, 4]
NUM_DRAWS = 8000


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Thousands of tiny verifications: torch's thread pool would only add wake-up costs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _request(
    params: SamplingParams, drafts: list[int] = DRAFTS, rid: str = "r"
) -> ScheduledRequest:
    return ScheduledRequest(
        request_id=rid, token_ids=list(PROMPT), start=len(PROMPT) - 1,
        num_tokens=1 + len(drafts), block_ids=[0], sample=True, sampling_params=params,
        num_prompt_tokens=len(PROMPT), draft_token_ids=list(drafts),
    )


def _target_probs(logits: torch.Tensor, prefix: list[int], params: SamplingParams) -> torch.Tensor:
    """The reference recipe for one position: repetition penalty over every token seen so
    far, temperature, top-k, softmax."""
    row = logits.clone()
    r = params.repetition_penalty
    for token in set(prefix):
        row[token] = row[token] / r if row[token] > 0 else row[token] * r
    row = row / params.temperature
    if params.top_k > 0:
        kth = row.topk(params.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    return torch.softmax(row, dim=-1)


def _expected_outcomes(
    logits: torch.Tensor, params: SamplingParams
) -> dict[tuple[int, ...], float]:
    """Probability of every emitted sequence under one-token-at-a-time sampling: it stops
    at the first token that differs from the draft, or after the bonus token."""
    outcomes: dict[tuple[int, ...], float] = {}
    prefix_prob = 1.0
    for i in range(len(DRAFTS) + 1):
        p = _target_probs(logits[i], PROMPT + DRAFTS[:i], params)
        for token in range(VOCAB):
            if i < len(DRAFTS) and token == DRAFTS[i]:
                continue
            outcomes[tuple(DRAFTS[:i]) + (token,)] = prefix_prob * float(p[token])
        if i < len(DRAFTS):
            prefix_prob *= float(p[DRAFTS[i]])
    return outcomes


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=4),
        SamplingParams(temperature=1.3, repetition_penalty=1.8, seed=11),
    ],
    ids=["plain", "top_k", "penalty_seeded"],
)
def test_emitted_tokens_follow_sequential_sampling(params: SamplingParams) -> None:
    torch.manual_seed(0)
    # Fixed rows: draft 3 is likely at position 0, draft 4 only moderately at position 1.
    logits = torch.tensor([
        [0.1, 0.5, -0.3, 1.5, 0.0, 0.2],
        [0.3, -0.2, 0.9, 0.1, 0.6, 0.0],
        [1.0, 0.2, 0.4, -0.5, 0.3, 0.8],
    ])
    # One request per draw: a seeded one draws from a generator of its own, as the runner's
    # sampler keeps it, so every draw gets a fresh generator of a different seed.
    counts: dict[tuple[int, ...], int] = {}
    for draw in range(NUM_DRAWS):
        request = _request(params, rid=f"r{draw}")
        generator = make_generator(draw, torch.device("cpu")) if params.seed is not None else None
        (verdict,) = verify_drafts(logits, [request], lambda _: generator)
        emitted = tuple(DRAFTS[: verdict.num_accepted]) + (verdict.token_id,)
        counts[emitted] = counts.get(emitted, 0) + 1
    expected = _expected_outcomes(logits, params)
    assert set(counts) <= {o for o, p in expected.items() if p > 0}, counts
    support = [o for o, p in expected.items() if p > 0]
    observed = [counts.get(o, 0) for o in support]
    total = sum(expected[o] for o in support)
    statistic, p_value = chisquare(
        observed, [NUM_DRAWS * expected[o] / total for o in support]
    )
    assert p_value > 1e-3, (statistic, p_value, counts)
    # The test means something only if drafts were both accepted and rejected.
    assert counts.get((3, 4, 0), 0) + sum(v for k, v in counts.items() if len(k) == 3) > 0
    assert sum(v for k, v in counts.items() if len(k) == 1) > 0


def test_greedy_keeps_drafts_while_they_are_the_argmax() -> None:
    logits = torch.tensor([
        [0.0, 0.0, 0.0, 2.0, 0.0, 0.0],  # argmax 3 == draft 0
        [0.0, 0.0, 0.0, 0.0, 0.0, 2.0],  # argmax 5 != draft 4
        [2.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ])
    (verdict,) = verify_drafts(logits, [_request(SamplingParams(temperature=0.0))], lambda _: None)
    assert (verdict.num_accepted, verdict.token_id) == (1, 5)
    logits[1, 4] = 3.0
    (verdict,) = verify_drafts(logits, [_request(SamplingParams(temperature=0.0))], lambda _: None)
    assert (verdict.num_accepted, verdict.token_id) == (2, 0)  # both kept, then the bonus


def test_seeded_verification_replays_exactly() -> None:
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=1.0, seed=5)

    def run() -> list[tuple[int, int]]:
        out = []
        generator = make_generator(5, torch.device("cpu"))
        for _ in range(50):
            (v,) = verify_drafts(logits, [_request(params)], lambda _: generator)
            out.append((v.num_accepted, v.token_id))
        return out

    assert run() == run()
    assert len(set(itertools.chain(run()))) > 1


def test_greedy_requests_verified_together_equal_one_at_a_time() -> None:
    """Many greedy requests of ragged draft counts, mixed with sampled and penalised ones, in
    one call: each greedy verdict is the plain-Python walk over its own rows (keep drafts
    while they are the row's argmax, then that row's argmax)."""
    gen = torch.Generator().manual_seed(11)
    requests, rows, expected = [], [], []
    for index in range(40):
        num_drafts = index % 5 + 1
        block = torch.randn(num_drafts + 1, VOCAB, generator=gen)
        argmax = block.argmax(dim=1).tolist()
        # Drafts that follow the argmax for a random number of rows, then differ.
        keep = int(torch.randint(0, num_drafts + 1, (1,), generator=gen))
        drafts = [argmax[i] if i < keep else (argmax[i] + 1) % VOCAB for i in range(num_drafts)]
        if index % 7 == 3:
            params = SamplingParams(temperature=0.0, repetition_penalty=1.5)
        elif index % 7 == 5:
            params = SamplingParams(temperature=1.0, seed=index)
        else:
            params = SamplingParams(temperature=0.0)
        requests.append(_request(params, drafts, rid=f"r{index}"))
        rows.append(block)
        expected.append((keep, argmax[keep]) if params.repetition_penalty == 1.0
                        and params.is_greedy else None)
    generators = {f"r{i}": make_generator(i, torch.device("cpu")) for i in range(40)}
    verdicts = verify_drafts(torch.cat(rows), requests, lambda r: generators[r.request_id])
    checked = 0
    for verdict, want, request in zip(verdicts, expected, requests, strict=True):
        assert 0 <= verdict.num_accepted <= len(request.draft_token_ids)
        if want is not None:
            assert (verdict.num_accepted, verdict.token_id) == want, request.request_id
            checked += 1
    assert checked > 20
