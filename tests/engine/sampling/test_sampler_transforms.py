"""Each sampling transform against hand-computed expectations on tiny logits."""
from __future__ import annotations

import math

import pytest
import torch

from engine.core.batch import ScheduledRequest
from engine.sampling.logit_bias import apply_logit_bias
from engine.sampling.penalties import apply_penalties
from engine.sampling.temperature import apply_temperature
from engine.sampling.top_k_top_p import Candidates, apply_min_p, apply_top_k_top_p
from engine.sampling_params import SamplingParams

NEG_INF = -math.inf
BASE_LOGITS = [2.0, -1.0, 0.5, 3.0, -2.0, 1.0]


def _request(
    prompt_ids: list[int], output_ids: list[int], params: SamplingParams
) -> ScheduledRequest:
    token_ids = prompt_ids + output_ids
    return ScheduledRequest(
        request_id="r",
        token_ids=token_ids,
        start=len(token_ids) - 1,
        num_tokens=1,
        block_ids=[0],
        sample=True,
        sampling_params=params,
        num_prompt_tokens=len(prompt_ids),
    )


def _kept(candidates: Candidates) -> list[set[int]]:
    """The token ids each row may still sample."""
    return [
        set(token_ids[row_logits > NEG_INF].tolist())
        for row_logits, token_ids in zip(candidates.logits, candidates.token_ids)
    ]


# Prompt [0, 1], output [3, 3, 4]: token 3 appears twice in the output, 4 once, 0 and 1 only
# in the prompt, 2 and 5 nowhere.
@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (SamplingParams(repetition_penalty=2.0), [1.0, -2.0, 0.5, 1.5, -4.0, 1.0]),
        (SamplingParams(presence_penalty=0.5), [2.0, -1.0, 0.5, 2.5, -2.5, 1.0]),
        (SamplingParams(frequency_penalty=0.25), [2.0, -1.0, 0.5, 2.5, -2.25, 1.0]),
        (
            SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
            [1.0, -2.0, 0.5, 0.5, -4.75, 1.0],
        ),
        (SamplingParams(frequency_penalty=-1.0), [2.0, -1.0, 0.5, 5.0, -1.0, 1.0]),
    ],
)
def test_penalties_change_exactly_the_seen_tokens(
    params: SamplingParams, expected: list[float]
) -> None:
    logits = torch.tensor([BASE_LOGITS])
    penalised = apply_penalties(logits, [_request([0, 1], [3, 3, 4], params)])
    assert penalised.tolist() == [pytest.approx(expected)]
    assert logits.tolist() == [BASE_LOGITS], "the input must not be modified"


def test_penalties_count_each_row_from_its_own_tokens() -> None:
    logits = torch.tensor([BASE_LOGITS, BASE_LOGITS, BASE_LOGITS])
    requests = [
        # presence ignores prompt tokens: only 2 (output) is penalised, not 0 (prompt).
        _request([0], [2], SamplingParams(presence_penalty=1.0)),
        # 5 is in both prompt and output; frequency counts output occurrences only (two).
        _request([5, 5, 5], [5, 5, 1], SamplingParams(frequency_penalty=1.0)),
        # No output yet: repetition still applies to the prompt.
        _request([3, 4], [], SamplingParams(repetition_penalty=4.0)),
    ]
    penalised = apply_penalties(logits, requests)
    assert penalised.tolist() == [
        pytest.approx([2.0, -1.0, -0.5, 3.0, -2.0, 1.0]),
        pytest.approx([2.0, -2.0, 0.5, 3.0, -2.0, -1.0]),
        pytest.approx([2.0, -1.0, 0.5, 0.75, -8.0, 1.0]),
    ]


def test_penalties_ignore_token_ids_outside_the_vocabulary() -> None:
    logits = torch.tensor([BASE_LOGITS])
    request = _request([0, 6, 1000], [3], SamplingParams(repetition_penalty=2.0))
    assert apply_penalties(logits, [request]).tolist() == [
        pytest.approx([1.0, -1.0, 0.5, 1.5, -2.0, 1.0])
    ]


def test_logit_bias_adds_to_the_named_tokens_of_each_row() -> None:
    logits = torch.zeros(3, 4)
    params = [
        SamplingParams(logit_bias={1: 5.0, 3: -100.0}),
        SamplingParams(),
        # Ids outside the vocabulary are dropped rather than failing the batch.
        SamplingParams(logit_bias={0: 1.5, 4: 3.0, -1: 2.0}),
    ]
    biased = apply_logit_bias(logits, params)
    assert biased.tolist() == [[0.0, 5.0, 0.0, -100.0], [0.0] * 4, [1.5, 0.0, 0.0, 0.0]]
    assert logits.abs().sum().item() == 0.0


def test_temperature_divides_each_row_by_its_own_temperature() -> None:
    logits = torch.tensor([[2.0, -4.0], [2.0, -4.0]])
    scaled = apply_temperature(logits, torch.tensor([2.0, 0.5]))
    assert scaled.tolist() == [[1.0, -2.0], [4.0, -8.0]]


@pytest.mark.parametrize("other_row_top_k", [3, 0], ids=["topk-path", "full-sort-path"])
def test_top_k_keeps_exactly_k_best(other_row_top_k: int) -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    top_k = torch.tensor([2, other_row_top_k])
    truncated = apply_top_k_top_p(logits, top_k, None)
    assert _kept(truncated)[0] == {1, 3}
    # Candidates come best first, with their logits (up to a per-row shift).
    assert truncated.token_ids[0, :2].tolist() == [1, 3]
    first, second = truncated.logits[0, :2].tolist()
    assert first - second == pytest.approx(1.0)
    # Ties still keep exactly k tokens; k == 0 keeps everything.
    assert len(_kept(truncated)[1]) == (other_row_top_k or 5)


@pytest.mark.parametrize(
    ("top_p", "expected_kept"),
    [(0.6, {1, 3}), (0.75, {1, 3, 2}), (0.01, {1}), (0.95, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_keeps_the_smallest_prefix_reaching_p(
    top_p: float, expected_kept: set[int]
) -> None:
    logits = torch.tensor([[0.1, 0.4, 0.2, 0.3]]).log()
    truncated = apply_top_k_top_p(logits, None, torch.tensor([top_p]))
    assert _kept(truncated) == [expected_kept]


def test_top_p_applies_to_the_distribution_left_by_top_k() -> None:
    # After top_k=2 the survivors 0.4 and 0.3 renormalise to 0.571 and 0.429, so top_p=0.5 keeps
    # only the best; measured on the untruncated distribution it would keep two (0.4 < 0.5).
    logits = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.1, 0.4, 0.2, 0.3]]).log()
    truncated = apply_top_k_top_p(logits, torch.tensor([2, 0]), torch.tensor([0.5, 0.5]))
    assert _kept(truncated) == [{1}, {1, 3}]


def test_min_p_removes_tokens_below_a_fraction_of_the_top_probability() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]).log()
    # Row 0: threshold 0.35 * 0.5 = 0.175 keeps 0.5 and 0.3. Row 1: min_p 0 disables.
    truncated = apply_min_p(logits, torch.tensor([0.35, 0.0]))
    assert truncated[0, 2:].tolist() == [NEG_INF, NEG_INF]
    assert truncated[0, :2].tolist() == pytest.approx(logits[0, :2].tolist())
    assert truncated[1].tolist() == pytest.approx(logits[1].tolist())


def _reference_kept(row_logits: list[float], top_k: int, top_p: float) -> set[int]:
    """Plain-Python top_k then top_p over a fully sorted row."""
    order = sorted(range(len(row_logits)), key=lambda token: -row_logits[token])
    if top_k > 0:
        order = order[:top_k]
    weights = [math.exp(row_logits[token] - row_logits[order[0]]) for token in order]
    total = sum(weights)
    kept, mass = set(), 0.0
    for token, weight in zip(order, weights):
        kept.add(token)
        mass += weight / total
        if mass >= top_p:
            break
    return kept


@pytest.mark.parametrize("scale", [2.0, 6.0], ids=["flat", "peaked"])
def test_top_k_top_p_matches_a_full_sort_reference_on_mixed_rows(scale: float) -> None:
    # Flat rows have nuclei of hundreds of tokens; peaked rows a handful.
    generator = torch.Generator().manual_seed(0)
    settings = [(0, 0.9), (5, 1.0), (0, 0.5), (40, 0.8), (0, 0.99), (3, 0.3), (100, 0.95)]
    logits = torch.randn(len(settings), 1000, generator=generator) * scale
    top_k = torch.tensor([k for k, _ in settings])
    top_p = torch.tensor([p for _, p in settings])
    kept = _kept(apply_top_k_top_p(logits, top_k, top_p))
    for row, (k, p) in enumerate(settings):
        assert kept[row] == _reference_kept(logits[row].tolist(), k, p), (k, p)


def test_top_p_without_top_k_keeps_long_nuclei_exactly() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 2000, generator=generator)
    top_p = torch.tensor([0.9, 0.5, 0.999])
    kept = _kept(apply_top_k_top_p(logits, None, top_p))
    for row, p in enumerate(top_p.tolist()):
        assert kept[row] == _reference_kept(logits[row].tolist(), 0, p)
    assert min(len(row_kept) for row_kept in kept) > 200
