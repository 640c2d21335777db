"""Greedy argmax through numpy (CPU float32) against torch.argmax, ties and NaN included, and
the sampler's all-greedy shortcut against float32 references for rows that must not take it."""
from __future__ import annotations

import math

import pytest
import torch

from engine.core.batch import ScheduledRequest
from engine.sampling import Sampler
from engine.sampling.draw import argmax_rows, greedy, greedy_token_ids
from engine.sampling_params import SamplingParams

VOCAB_SIZE = 1000
GREEDY = SamplingParams(temperature=0.0)


def _logits_with_ties(num_rows: int, seed: int) -> torch.Tensor:
    """Random rows in which the maximum is copied to other columns (before and after it), and
    some rows hold NaN, -inf only, or tied +inf."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, VOCAB_SIZE, generator=generator) * 3.0
    for row in range(num_rows):
        best = int(logits[row].argmax())
        for column in torch.randint(0, VOCAB_SIZE, (row % 4,), generator=generator).tolist():
            logits[row, column] = logits[row, best]
    logits[1] = -math.inf
    logits[2, [5, 700]] = math.inf
    logits[3, [40, 9]] = math.nan
    logits[4] = 0.0
    logits[5, ::2] = -0.0  # -0.0 == 0.0: ties with the zeros between them
    logits[5, 1::2] = 0.0
    logits[5, 500:] = -1.0
    return logits


def _request(request_id: str, params: SamplingParams, token_ids: list[int]) -> ScheduledRequest:
    return ScheduledRequest(
        request_id=request_id, token_ids=token_ids, start=len(token_ids) - 1, num_tokens=1,
        block_ids=[0], sample=True, sampling_params=params, num_prompt_tokens=1,
    )


@pytest.mark.parametrize("seed", range(5))
def test_argmax_rows_matches_torch_argmax_with_ties_and_nan(seed: int) -> None:
    logits = _logits_with_ties(64, seed)
    expected = logits.argmax(dim=-1)
    for values in (logits, logits.t().contiguous().t(), logits[:, :777], logits[::3]):
        reference = values.argmax(dim=-1)
        assert torch.equal(argmax_rows(values), reference)
        assert greedy_token_ids(values) == reference.tolist()
    assert torch.equal(greedy(logits), expected)
    assert argmax_rows(logits).dtype == torch.int64
    assert torch.equal(argmax_rows(logits.clone().requires_grad_()), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_other_dtypes_take_the_same_argmax_as_their_float32_upcast(dtype: torch.dtype) -> None:
    logits = _logits_with_ties(32, seed=9).to(dtype)
    expected = logits.float().argmax(dim=-1)
    assert torch.equal(argmax_rows(logits), expected)
    assert greedy_token_ids(logits) == expected.tolist()


def test_all_greedy_batch_takes_the_float32_argmax() -> None:
    logits = _logits_with_ties(64, seed=3)
    requests = [_request(f"r{i}", GREEDY, [1, 2, 3]) for i in range(64)]
    output = Sampler().sample_with_logprobs(logits, requests)
    assert output.token_ids == logits.argmax(dim=-1).tolist()
    assert output.logprobs is None


def test_greedy_rows_with_logprobs_report_the_float32_log_softmax() -> None:
    logits = _logits_with_ties(8, seed=4)[6:].to(torch.bfloat16)  # two finite rows
    requests = [
        _request("plain", GREEDY, [1, 2]),
        _request("asks", SamplingParams(temperature=0.0, logprobs=2), [1, 2]),
    ]
    output = Sampler().sample_with_logprobs(logits, requests)
    reference = logits.float()
    assert output.token_ids == reference.argmax(dim=-1).tolist()
    assert output.logprobs is not None and output.logprobs[0] is None
    entry = output.logprobs[1]
    assert entry is not None
    log_probs = torch.log_softmax(reference[1], dim=-1)
    assert entry.logprob == pytest.approx(float(log_probs[output.token_ids[1]]), abs=1e-6)
    top = log_probs.topk(2)
    assert entry.top_token_ids == top.indices.tolist()


def test_penalised_greedy_rows_match_a_float32_reference() -> None:
    logits = _logits_with_ties(16, seed=5)[6:]  # finite rows
    history = [int(token_id) for token_id in logits.argmax(dim=-1)]  # each row's best token
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    requests = [
        _request(f"r{i}", params if i % 2 else GREEDY, [history[i], history[i]])
        for i in range(len(history))
    ]
    reference = logits.clone()
    for row in range(1, len(history), 2):
        value = reference[row, history[row]]
        reference[row, history[row]] = value / 1.5 if value > 0 else value * 1.5
    assert Sampler().sample(logits, requests) == reference.argmax(dim=-1).tolist()
