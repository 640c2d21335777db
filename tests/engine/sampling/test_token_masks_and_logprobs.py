"""min_tokens, allowed_token_ids, bad_words and logprobs of the final distribution, on
hand-made logits with hand-computed expectations."""
from __future__ import annotations

import math

import torch

from engine.core.batch import ScheduledRequest
from engine.sampling import Sampler
from engine.sampling_params import SamplingParams

VOCAB_SIZE = 8
EOS = 7


def _request(
    params: SamplingParams, output: list[int] = (), prompt: list[int] = (1, 2), rid: str = "r"
) -> ScheduledRequest:
    token_ids = [*prompt, *output]
    return ScheduledRequest(
        request_id=rid, token_ids=token_ids, start=len(token_ids) - 1, num_tokens=1,
        block_ids=[0], sample=True, sampling_params=params, num_prompt_tokens=len(prompt),
        eos_token_ids=frozenset({EOS}),
    )


def _logits_favouring(*token_ids: int) -> torch.Tensor:
    """Token token_ids[0] best, then token_ids[1], ...; the rest at 0."""
    logits = torch.zeros(1, VOCAB_SIZE)
    for rank, token_id in enumerate(token_ids):
        logits[0, token_id] = 10.0 - rank
    return logits


def _greedy(params: SamplingParams, logits: torch.Tensor, output: list[int] = ()) -> int:
    return Sampler().sample(logits, [_request(params, list(output))])[0]


def test_min_tokens_masks_eos_and_stop_tokens_until_enough_outputs() -> None:
    logits = _logits_favouring(EOS, 5, 3)
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(5,))
    assert _greedy(params, logits, output=[]) == 3
    assert _greedy(params, logits, output=[4]) == 3
    assert _greedy(params, logits, output=[4, 4]) == EOS


def test_ignore_eos_leaves_eos_unmasked_under_min_tokens() -> None:
    params = SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True, stop_token_ids=(5,))
    assert _greedy(params, _logits_favouring(EOS, 5, 3)) == EOS
    assert _greedy(params, _logits_favouring(5, 3)) == 3


def test_allowed_token_ids_mask_every_other_token() -> None:
    params = SamplingParams(temperature=0.0, allowed_token_ids=(2, 4))
    assert _greedy(params, _logits_favouring(1, 3, 4, 2)) == 4
    sampled = SamplingParams(temperature=1.0, seed=3, allowed_token_ids=(2, 4))
    sampler = Sampler()
    draws = {sampler.sample(torch.randn(1, VOCAB_SIZE), [_request(sampled)])[0] for _ in range(50)}
    assert draws <= {2, 4}


def test_bad_words_ban_single_tokens_always_and_endings_after_their_prefix() -> None:
    params = SamplingParams(temperature=0.0, bad_words_token_ids=((6,), (2, 3)))
    logits = _logits_favouring(6, 3, 1)
    assert _greedy(params, logits, output=[]) == 3  # 6 banned; (2, 3) prefix absent
    assert _greedy(params, logits, output=[4, 2]) == 1  # output ends with 2: 3 banned
    assert _greedy(params, logits, output=[2, 4]) == 3


def test_masks_apply_per_row_in_a_mixed_batch() -> None:
    logits = _logits_favouring(EOS, 5).repeat(3, 1)
    requests = [
        _request(SamplingParams(temperature=0.0, min_tokens=1), rid="a"),
        _request(SamplingParams(temperature=0.0), rid="b"),
        _request(SamplingParams(temperature=0.0, allowed_token_ids=(0,)), rid="c"),
    ]
    assert Sampler().sample(logits, requests) == [5, EOS, 0]


def test_greedy_logprobs_are_log_softmax_of_the_adjusted_logits() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0, 0.0, 0.0, 0.0]])
    params = SamplingParams(temperature=0.0, logprobs=2, logit_bias={1: 3.0})
    out = Sampler().sample_with_logprobs(logits, [_request(params)])
    adjusted = logits.clone()
    adjusted[0, 1] += 3.0
    expected = torch.log_softmax(adjusted, dim=-1)[0]
    entry = out.logprobs[0]
    assert out.token_ids == [1] and entry.token_id == 1 and entry.rank == 1
    assert math.isclose(entry.logprob, expected[1].item(), rel_tol=1e-6)
    assert entry.top_token_ids == [1, 0]
    assert torch.allclose(torch.tensor(entry.top_logprobs), expected[[1, 0]])


def test_sampled_logprobs_come_from_the_truncated_tempered_distribution() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    params = SamplingParams(temperature=0.5, top_k=2, logprobs=3, seed=1)
    out = Sampler().sample_with_logprobs(logits, [_request(params)])
    # top_k 2 at temperature 0.5: p(0) : p(1) = e^6 : e^4, everything else 0.
    log_z = math.log(math.exp(6.0) + math.exp(4.0))
    expected = {0: 6.0 - log_z, 1: 4.0 - log_z}
    entry = out.logprobs[0]
    assert entry.token_id in expected
    assert math.isclose(entry.logprob, expected[entry.token_id], rel_tol=1e-5)
    assert entry.rank == (1 if entry.token_id == 0 else 2)
    assert entry.top_token_ids[:2] == [0, 1]
    assert entry.top_logprobs[2] == -math.inf


def test_rows_that_do_not_ask_get_no_logprobs() -> None:
    logits = torch.randn(2, VOCAB_SIZE)
    requests = [
        _request(SamplingParams(temperature=0.0), rid="a"),
        _request(SamplingParams(temperature=1.0, logprobs=0), rid="b"),
    ]
    out = Sampler().sample_with_logprobs(logits, requests)
    assert out.logprobs[0] is None
    entry = out.logprobs[1]
    assert entry.top_token_ids == [] and entry.token_id == out.token_ids[1]
    expected = torch.log_softmax(logits[1], dim=-1)[entry.token_id].item()
    assert math.isclose(entry.logprob, expected, rel_tol=1e-5)
    assert Sampler().sample_with_logprobs(logits[:1], requests[:1]).logprobs is None
