"""logprobs and prompt_logprobs against torch.log_softmax of transformers' float32 logits,
through the whole engine (chunked prefill, prefix cache, batching)."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.frontend.llm import LLM
from engine.sampling_params import SamplingParams

TOP_N = 5


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> LLM:
    # A small step budget splits the prompts into chunks.
    return LLM(str(tiny_llama_dir), dtype="float32", num_kv_blocks=64, max_num_batched_tokens=8)


def _log_softmax(model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def _prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 500) for _ in range(length)]


def _assert_entry(entry, expected_row: torch.Tensor, token_id: int) -> None:
    assert entry.token_id == token_id
    assert abs(entry.logprob - expected_row[token_id].item()) < 1e-4
    assert entry.rank == int((expected_row > expected_row[token_id]).sum()) + 1
    top_values, top_ids = expected_row.topk(TOP_N)
    assert entry.top_token_ids == top_ids.tolist()
    assert torch.allclose(torch.tensor(entry.top_logprobs), top_values, atol=1e-4)


def test_sampled_logprobs_match_transformers(llm: LLM, reference) -> None:
    prompts = [_prompt(1, 13), _prompt(2, 5)]
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=6, logprobs=TOP_N, ignore_eos=True)
    for out in llm.generate(prompts, params):
        assert len(out.logprobs) == len(out.token_ids) == 6
        expected = _log_softmax(reference, out.prompt_token_ids + out.token_ids)
        for i, (entry, token_id) in enumerate(zip(out.logprobs, out.token_ids)):
            _assert_entry(entry, expected[len(out.prompt_token_ids) - 1 + i], token_id)


def test_greedy_logprobs_match_transformers(llm: LLM, reference) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=TOP_N, ignore_eos=True)
    (out,) = llm.generate([_prompt(3, 9)], params)
    expected = _log_softmax(reference, out.prompt_token_ids + out.token_ids)
    for i, (entry, token_id) in enumerate(zip(out.logprobs, out.token_ids)):
        assert entry.rank == 1
        _assert_entry(entry, expected[len(out.prompt_token_ids) - 1 + i], token_id)


def test_prompt_logprobs_cover_every_position_despite_chunks_and_cache(
    llm: LLM, reference
) -> None:
    prompt = _prompt(4, 21)  # three chunks of 8
    plain = SamplingParams(temperature=0.0, max_tokens=2)
    asking = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=TOP_N)
    llm.generate([prompt], plain)  # fills the prefix cache with this prompt
    (out,) = llm.generate([prompt], asking)
    assert out.num_cached_tokens == 0
    expected = _log_softmax(reference, prompt)
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    for position in range(1, len(prompt)):
        _assert_entry(out.prompt_logprobs[position], expected[position - 1], prompt[position])
    assert out.logprobs is None
