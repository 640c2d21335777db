"""Speculative decoding on the whole offline engine: greedy output equals transformers'
greedy decoding and the engine's own non-speculative output, with drafts really accepted
(counted by the engine), under continuous batching with non-speculating rows, prefix caching
and preemption."""
from __future__ import annotations

from pathlib import Path

import pytest
from greedy_reference import (
    GREEDY,
    assert_concurrent_greedy_matches,
    make_peaked_model,
    prompts_from,
)

from engine.frontend.llm import LLM
from engine.sampling_params import SamplingParams

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
         "prompt_lookup_min": 1}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peaked_model(tmp_path_factory.mktemp("spec-llama"), "llama")


def _repetitive(seed: int, period: int, repeats: int) -> list[int]:
    """A prompt that repeats itself (code editing, summaries quoting their input)."""
    return prompts_from(seed, [period])[0] * repeats


def _stats(llm: LLM):
    spec = llm.core.scheduler.spec
    assert spec is not None
    return spec.stats


def test_greedy_equals_transformers_and_drafts_are_accepted(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), dtype="float32", num_kv_blocks=256, block_size=4,
              speculative_config=NGRAM)
    prompts = [_repetitive(1, 12, 4), _repetitive(2, 5, 6)] + prompts_from(3, [1, 7, 30])
    assert_concurrent_greedy_matches(llm, llama_dir, prompts)
    stats = _stats(llm)
    assert stats.num_drafts > 0 and stats.num_accepted_tokens > 0, stats
    assert stats.num_accepted_tokens < stats.num_draft_tokens  # rejections were rolled back
    assert sum(stats.accepted_per_pos) == stats.num_accepted_tokens


def test_mixed_batch_equals_the_non_speculative_engine(llama_dir: Path) -> None:
    """Rows that speculate (greedy with penalties, min_tokens, logit bias) and rows that do
    not (logprobs, prompt_logprobs) share every step; each row's tokens, and the logprobs of
    the rows that ask, are the non-speculative engine's."""
    prompts = [_repetitive(4, 9, 5), _repetitive(5, 6, 6), _repetitive(6, 11, 3),
               _repetitive(7, 8, 4), prompts_from(8, [20])[0]]
    params = [
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=40, repetition_penalty=1.3,
                       frequency_penalty=0.2, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=40, logprobs=2, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=40, prompt_logprobs=1, ignore_eos=True,
                       logit_bias={7: 3.0}),
        SamplingParams(temperature=0.0, max_tokens=40, min_tokens=10, ignore_eos=True,
                       presence_penalty=0.5),
    ]
    plain = LLM(str(llama_dir), dtype="float32", num_kv_blocks=256, block_size=4,
                max_num_batched_tokens=32)
    spec = LLM(str(llama_dir), dtype="float32", num_kv_blocks=256, block_size=4,
               max_num_batched_tokens=32, speculative_config=NGRAM)
    expected = plain.generate(prompts, params)
    got = spec.generate(prompts, params)
    for want, out in zip(expected, got, strict=True):
        assert out.token_ids == want.token_ids
        _assert_same_logprobs(out.logprobs, want.logprobs)
        _assert_same_logprobs(out.prompt_logprobs, want.prompt_logprobs)
    assert _stats(spec).num_accepted_tokens > 0
    spec.core.scheduler.check_invariants()
    assert spec.core.kv_cache.pool.num_free_blocks == spec.core.kv_cache.num_blocks


def _assert_same_logprobs(got, want) -> None:
    """Same tokens and ranks; values equal up to float32 rounding (the batches' row layouts
    differ, so the matmuls sum in different orders)."""
    assert (got is None) == (want is None)
    for a, b in zip(got or [], want or [], strict=True):
        assert (a is None) == (b is None)
        if a is None:
            continue
        assert (a.token_id, a.rank, a.top_token_ids) == (b.token_id, b.rank, b.top_token_ids)
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert a.top_logprobs == pytest.approx(b.top_logprobs, abs=1e-5)


def test_prefix_cache_holds_only_accepted_tokens(llama_dir: Path) -> None:
    """A later prompt extending an earlier request's prompt + output hits the blocks that
    request's accepted drafts filled, and continues exactly as without speculation."""
    prompt = _repetitive(9, 7, 5)
    spec = LLM(str(llama_dir), dtype="float32", num_kv_blocks=256, block_size=4,
               speculative_config=NGRAM)
    plain = LLM(str(llama_dir), dtype="float32", num_kv_blocks=256, block_size=4,
                enable_prefix_caching=False)
    first = spec.generate([prompt], GREEDY)[0]
    assert first.token_ids == plain.generate([prompt], GREEDY)[0].token_ids
    assert _stats(spec).num_accepted_tokens > 0
    extended = prompt + first.token_ids[:24]
    again = spec.generate([extended], GREEDY)[0]
    # Every full block of the prompt and of the first 24 outputs was published.
    assert again.num_cached_tokens == (len(extended) - 1) // 4 * 4
    assert again.token_ids == plain.generate([extended], GREEDY)[0].token_ids


def test_preemption_under_a_tiny_kv_pool(llama_dir: Path) -> None:
    prompts = [_repetitive(10 + i, 5 + i, 4) for i in range(8)]
    plain = LLM(str(llama_dir), dtype="float32", num_kv_blocks=512, block_size=4)
    expected = [o.token_ids for o in plain.generate(prompts, GREEDY)]
    tight = LLM(str(llama_dir), dtype="float32", num_kv_blocks=40, block_size=4,
                speculative_config=NGRAM)
    got = [o.token_ids for o in tight.generate(prompts, GREEDY)]
    assert got == expected
    assert tight.core.scheduler.num_preemptions > 0
    assert _stats(tight).num_accepted_tokens > 0
    tight.core.scheduler.check_invariants()
    assert tight.core.kv_cache.pool.num_free_blocks == 40


def test_random_text_backs_off(llama_dir: Path) -> None:
    """Requests whose drafts keep being rejected stop proposing for a while: fewer
    verifications than with the back-off disabled (an acceptance floor of 0)."""
    prompts = prompts_from(20, [40, 50, 60])
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=64, ignore_eos=True)
    num_drafts = {}
    for floor in (0.0, 0.9):
        spec = LLM(str(llama_dir), dtype="float32", num_kv_blocks=256, block_size=4,
                   speculative_config={**NGRAM, "acceptance_floor": floor})
        spec.generate(prompts, params)
        num_drafts[floor] = _stats(spec).num_drafts
    assert num_drafts[0.9] < num_drafts[0.0] / 2, num_drafts


@pytest.mark.parametrize(("arch", "num_kv_blocks"), [("mistral_window", 10), ("gemma2", 24)])
def test_sliding_window_model_gives_blocks_back_and_equals_transformers(
    tmp_path: Path, arch: str, num_kv_blocks: int
) -> None:
    """Windowed layers (every layer, or Gemma 2's alternate ones with their own KV cache
    group): blocks behind the window go back while drafts come and go, in a cache too small
    for all requests at once."""
    model_dir = make_peaked_model(tmp_path / arch, arch)
    llm = LLM(str(model_dir), dtype="float32", max_num_batched_tokens=40,
              num_kv_blocks=num_kv_blocks, block_size=8, speculative_config=NGRAM)
    prompts = [_repetitive(30, 9, 4), _repetitive(31, 13, 3)] + prompts_from(32, [7, 33])
    assert_concurrent_greedy_matches(llm, model_dir, prompts)
    assert _stats(llm).num_accepted_tokens > 0


def test_sliding_window_groups_keep_greedy_output(tmp_path: Path) -> None:
    """Gemma 2 (alternating windowed and full layers: two KV cache groups; attention
    soft-cap): verification rows of both groups give the non-speculative engine's greedy
    tokens, far past the window."""
    model_dir = make_peaked_model(tmp_path / "gemma2", "gemma2")
    prompts = [_repetitive(14, 5, 6), _repetitive(17, 5, 6), _repetitive(19, 5, 6),
               prompts_from(11, [15])[0]]
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    plain = LLM(str(model_dir), dtype="float32", num_kv_blocks=256, block_size=4)
    spec = LLM(str(model_dir), dtype="float32", num_kv_blocks=256, block_size=4,
               speculative_config=NGRAM)
    expected = [out.token_ids for out in plain.generate(prompts, params)]
    assert [out.token_ids for out in spec.generate(prompts, params)] == expected
    assert _stats(spec).num_accepted_tokens > 0
