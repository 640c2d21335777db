"""The Sampler end to end: greedy rows, seeded determinism, and the sampled distribution."""
from __future__ import annotations

import random

import pytest
import torch

from engine.core.batch import ScheduledRequest
from engine.sampling import Sampler
from engine.sampling_params import SamplingParams

VOCAB_SIZE = 64


def _request(
    request_id: str,
    params: SamplingParams,
    token_ids: list[int] | None = None,
    num_prompt_tokens: int | None = None,
) -> ScheduledRequest:
    token_ids = token_ids if token_ids is not None else [1, 2, 3]
    return ScheduledRequest(
        request_id=request_id,
        token_ids=token_ids,
        start=len(token_ids) - 1,
        num_tokens=1,
        block_ids=[0],
        sample=True,
        sampling_params=params,
        num_prompt_tokens=len(token_ids) if num_prompt_tokens is None else num_prompt_tokens,
    )


def _random_logits(num_rows: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, VOCAB_SIZE, generator=generator) * 2.0


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=1, temperature=0.7),
        SamplingParams(temperature=0.0, seed=5, top_p=0.5),
    ],
)
def test_greedy_rows_take_the_argmax_without_consuming_randomness(
    params: SamplingParams,
) -> None:
    logits = _random_logits(8, seed=1)
    torch.manual_seed(0)
    rng_state = torch.get_rng_state()
    sampler = Sampler()
    token_ids = sampler.sample(logits, [_request(f"g{i}", params) for i in range(8)])
    assert token_ids == logits.argmax(dim=-1).tolist()
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert sampler.num_seeded_requests == 0


def test_mixed_batch_keeps_greedy_rows_greedy_and_leaves_logits_untouched() -> None:
    logits = _random_logits(6, seed=2)
    original = logits.clone()
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(seed=7, top_k=5),
        SamplingParams(temperature=0.0),
        SamplingParams(seed=8, top_p=0.5, min_p=0.1),
        SamplingParams(seed=9, temperature=1.5),
        SamplingParams(temperature=0.0),
    ]
    token_ids = Sampler().sample(logits, [_request(f"r{i}", p) for i, p in enumerate(params)])
    for row in (0, 2, 5):
        assert token_ids[row] == logits[row].argmax().item()
    assert token_ids[1] in logits[1].topk(5).indices.tolist()
    sorted_probs, sorted_ids = torch.softmax(logits[3], dim=-1).sort(descending=True)
    in_nucleus = torch.cumsum(sorted_probs, dim=0) - sorted_probs < 0.5
    assert token_ids[3] in sorted_ids[in_nucleus].tolist()
    assert torch.equal(logits, original)


def test_greedy_rows_see_bias_and_penalties() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0], [0.0, 3.0, 2.0, 1.0]])
    requests = [
        # Token 1 was already generated; a repetition penalty of 2 brings it to 1.5 < 2.0.
        _request("a", SamplingParams(temperature=0.0, repetition_penalty=2.0), [3, 1], 1),
        _request("b", SamplingParams(temperature=0.0, logit_bias={3: 10.0})),
    ]
    assert Sampler().sample(logits, requests) == [2, 3]


def test_mismatched_rows_and_requests_are_rejected() -> None:
    with pytest.raises(ValueError):
        Sampler().sample(torch.zeros(3, VOCAB_SIZE), [_request("a", SamplingParams())])


def _draw_sequence(
    sampler: Sampler,
    target: ScheduledRequest,
    target_logits: torch.Tensor,
    num_steps: int,
    num_others: int = 0,
) -> list[int]:
    """Sample `target` for `num_steps` steps, at a shuffled row among `num_others` other rows."""
    shuffler = random.Random(3)
    sequence = []
    for step in range(num_steps):
        others = [
            _request(
                f"other{i}",
                SamplingParams(
                    seed=1000 + i if i % 2 else None,
                    temperature=0.5 + 0.1 * i,
                    # Even steps: every row has a top_k; odd steps some rows sort the full vocab.
                    top_k=(i % 4 + 2) if step % 2 == 0 else (i % 3) * 7,
                    top_p=0.8 if i % 3 == 0 else 1.0,
                ),
            )
            for i in range(num_others)
        ]
        row = shuffler.randrange(num_others + 1)
        requests = others[:row] + [target] + others[row:]
        logits = _random_logits(num_others + 1, seed=100 + step)
        logits[row] = target_logits
        sequence.append(sampler.sample(logits, requests)[row])
    return sequence


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(seed=1234, temperature=1.5, top_k=40, top_p=0.95),
        SamplingParams(seed=1234, top_p=0.9),
        SamplingParams(seed=1234, temperature=1.5),
        SamplingParams(seed=1234, min_p=0.05, repetition_penalty=1.3),
    ],
    ids=["top_k+top_p", "top_p", "temperature", "min_p+penalty"],
)
def test_seed_gives_the_same_tokens_alone_and_in_a_batch(params: SamplingParams) -> None:
    target_logits = _random_logits(1, seed=4)[0]
    alone = _draw_sequence(Sampler(), _request("t", params), target_logits, num_steps=12)
    in_batch = _draw_sequence(
        Sampler(), _request("t", params), target_logits, num_steps=12, num_others=15
    )
    assert alone == in_batch
    # The generator advances every step: a 12-step sequence from a flat-ish distribution
    # with a single repeated token would mean it did not.
    assert len(set(alone)) > 1


def test_different_seeds_give_different_tokens() -> None:
    target_logits = _random_logits(1, seed=5)[0]
    sequences = [
        _draw_sequence(
            Sampler(), _request("t", SamplingParams(seed=seed, temperature=2.0)), target_logits, 12
        )
        for seed in (1, 2, -1)
    ]
    assert sequences[0] != sequences[1]
    assert sequences[0] != sequences[2]


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**63 - 1, 0])
def test_extreme_and_negative_seeds_are_reproducible(seed: int) -> None:
    request = _request("t", SamplingParams(seed=seed, temperature=2.0))
    target_logits = _random_logits(1, seed=6)[0]
    first = _draw_sequence(Sampler(), request, target_logits, num_steps=8)
    assert _draw_sequence(Sampler(), request, target_logits, num_steps=8) == first


def test_free_forgets_the_generator_so_the_sequence_restarts() -> None:
    sampler = Sampler()
    request = _request("t", SamplingParams(seed=42, temperature=2.0))
    target_logits = _random_logits(1, seed=7)[0]
    first = _draw_sequence(sampler, request, target_logits, num_steps=8)
    continued = _draw_sequence(sampler, request, target_logits, num_steps=8)
    assert continued != first
    assert sampler.num_seeded_requests == 1
    sampler.free(["t", "never-seen"])
    assert sampler.num_seeded_requests == 0
    assert _draw_sequence(sampler, request, target_logits, num_steps=8) == first


PROBS = [0.5, 0.25, 0.15, 0.1]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (SamplingParams(), PROBS),
        # temperature 0.5 squares the probabilities; top_k 3 drops 0.1 and renormalises:
        # [0.25, 0.0625, 0.0225] / 0.335.
        (SamplingParams(temperature=0.5, top_k=3), [0.746269, 0.186567, 0.067164, 0.0]),
        # top_p 0.7 keeps {0.5, 0.25}: [2/3, 1/3].
        (SamplingParams(top_p=0.7), [2 / 3, 1 / 3, 0.0, 0.0]),
    ],
)
@pytest.mark.parametrize("seeded", [False, True], ids=["unseeded", "seeded"])
def test_sampled_frequencies_match_the_distribution(
    params: SamplingParams, expected: list[float], seeded: bool
) -> None:
    num_draws = 20_000
    logits = torch.tensor(PROBS).log().expand(num_draws, -1).contiguous()
    torch.manual_seed(11)
    requests = [
        _request(
            f"r{i}",
            SamplingParams(
                temperature=params.temperature,
                top_k=params.top_k,
                top_p=params.top_p,
                seed=i if seeded else None,
            ),
        )
        for i in range(num_draws)
    ]
    token_ids = torch.tensor(Sampler().sample(logits, requests))
    frequencies = torch.bincount(token_ids, minlength=len(PROBS)).double() / num_draws
    # Standard error is <= 0.0036 per token at 20k draws; 0.015 is over 4 of them.
    assert frequencies.tolist() == pytest.approx(expected, abs=0.015)
