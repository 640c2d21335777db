"""The whole engine (scheduler + KV cache + runner + sampler) against transformers' greedy
`generate`, with requests batched concurrently, chunked, sharing prefixes and preempted."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
from family_configs import FAMILIES
from greedy_reference import (
    GREEDY,
    NUM_NEW_TOKENS,
    assert_concurrent_greedy_matches,
    make_peaked_model,
    prompts_from,
)

from engine.frontend.llm import LLM
from engine.sampling_params import SamplingParams


@pytest.mark.parametrize("arch", [*FAMILIES, "mistral_window"])
def test_every_family_equals_transformers_batched_chunked_cached_preempted(
    tmp_path: Path, arch: str
) -> None:
    model_dir = make_peaked_model(tmp_path / arch, arch)
    prefix = prompts_from(7, [16])[0]
    # The two prompts sharing a cached 16-token prefix come first, so they are admitted while
    # its blocks are still cached; the rest are of every length around the block size.
    prompts = prompts_from(2, [3, 20], prefix) + prompts_from(1, [1, 7, 17, 33, 60])
    # A small token budget forces chunked prefill mixed with decodes of other requests; a KV
    # cache of 24 blocks of 8 cannot hold all seven at once and forces preemption. A model
    # windowed on every layer gives back blocks behind the window, so it needs fewer.
    llm = LLM(
        str(model_dir), dtype="float32", max_num_batched_tokens=40,
        num_kv_blocks=10 if arch == "mistral_window" else 24, block_size=8,
    )
    llm.generate([prefix + [5]], GREEDY)
    outputs = assert_concurrent_greedy_matches(llm, model_dir, prompts)
    assert [o.num_cached_tokens for o in outputs[:2]] == [16, 16]
    assert llm.core.scheduler.num_preemptions > 0


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peaked_model(tmp_path_factory.mktemp("llama"), "llama")


def test_shared_prefixes_and_preemption_keep_outputs(llama_dir: Path) -> None:
    system = prompts_from(7, [48])[0]
    prompts = prompts_from(2, [random.Random(i).randrange(1, 30) for i in range(64)], system)
    alone = LLM(str(llama_dir), dtype="float32", num_kv_blocks=512, enable_prefix_caching=False)
    expected = [alone.generate([p], GREEDY)[0].token_ids for p in prompts[:6]]
    # 64 concurrent requests sharing a 48-token system prompt (3 blocks) that one earlier
    # request left in the prefix cache: every one of them starts past it.
    shared = LLM(str(llama_dir), dtype="float32", num_kv_blocks=1024)
    shared.generate([system + [5]], GREEDY)
    outputs = shared.generate(prompts, GREEDY)
    assert [o.token_ids for o in outputs[:6]] == expected
    assert [o.num_cached_tokens for o in outputs] == [48] * 64
    # A KV cache far too small for 64 requests at once forces preemption by recompute.
    tight = LLM(str(llama_dir), dtype="float32", num_kv_blocks=24, block_size=8)
    tight_outputs = tight.generate(prompts[:12], GREEDY)
    assert tight.core.scheduler.num_preemptions > 0
    assert [o.token_ids for o in tight_outputs[:6]] == expected
    tight.core.scheduler.check_invariants()
    assert tight.core.kv_cache.pool.num_free_blocks == 24


def test_prefix_cache_skips_recomputation(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), dtype="float32", num_kv_blocks=256, max_num_batched_tokens=16)
    prompt = prompts_from(3, [70])[0]
    first = llm.generate([prompt], GREEDY)[0]
    steps_before = llm.core.num_steps
    tokens_before = llm.core.num_computed_tokens_total
    second = llm.generate([prompt], GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 64  # 4 full blocks of 16 are reused
    assert second.token_ids == first.token_ids
    # Only the 6 uncached prompt tokens and the 31 fed-back outputs are computed, in one
    # prefill step plus 31 decode steps (the uncached run needed 5 prefill chunks).
    assert llm.core.num_computed_tokens_total - tokens_before == 6 + NUM_NEW_TOKENS - 1
    assert llm.core.num_steps - steps_before == NUM_NEW_TOKENS


def test_seeded_sampling_is_batch_invariant(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), dtype="float32", num_kv_blocks=512)
    prompt = prompts_from(4, [12])[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate([prompt], seeded)[0].token_ids
    others = prompts_from(5, [5, 9, 14, 20, 3, 8, 30])
    mixed_params = [SamplingParams(temperature=0.8, max_tokens=24, seed=None)] * len(others)
    batch = llm.generate([*others, prompt], [*mixed_params, seeded])
    assert batch[-1].token_ids == alone
    different_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=24, ignore_eos=True)
    assert llm.generate([prompt], different_seed)[0].token_ids != alone
