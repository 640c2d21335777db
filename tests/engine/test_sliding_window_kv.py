"""A sliding-window model (Mistral, every layer windowed, W = 8) through the whole engine
with a KV cache that gives back blocks behind the window: long generations of many
concurrent requests in a cache far too small to hold them whole, so given-back blocks serve
other requests while the windowed ones go on; greedy tokens must equal transformers'."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from family_configs import TEST_WINDOW
from greedy_reference import assert_transformers_greedy, make_peaked_model, prompts_from
from transformers import AutoModelForCausalLM

from engine.frontend.llm import LLM
from engine.sampling_params import SamplingParams

NUM_NEW = 64
BLOCK_SIZE = 4
GREEDY_LONG = SamplingParams(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)


CONCURRENT_PROMPTS = prompts_from(11, [3, 9, 14, 21, 5, 30, 17, 11, 26, 7])
FIRST_PROMPT = prompts_from(12, [18])[0]
OTHER_PROMPTS = prompts_from(13, [4, 25])


@pytest.fixture(scope="module")
def window_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peaked_model(tmp_path_factory.mktemp("mistral_window"), "mistral_window")


@pytest.fixture(scope="module")
def reference_model(window_dir: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(window_dir, dtype=torch.float32).eval()
    assert model.config.sliding_window == TEST_WINDOW
    return model


def window_llm(model_dir: Path, backend: str, num_kv_blocks: int) -> LLM:
    # A small token budget mixes chunked prefills with the others' decodes.
    return LLM(
        str(model_dir), dtype="float32", attention_backend=backend, block_size=BLOCK_SIZE,
        num_kv_blocks=num_kv_blocks, max_num_batched_tokens=24,
    )


@pytest.mark.parametrize("backend", ["cpu_paged", "torch"])
def test_long_concurrent_generations_reuse_given_back_blocks(
    window_dir: Path, reference_model: torch.nn.Module, backend: str
) -> None:
    prompts = CONCURRENT_PROMPTS
    # 10 requests of 67..94 tokens (17..24 blocks each, ~210 together) in 40 blocks: without
    # the give-back not even two would fit at once.
    llm = window_llm(window_dir, backend, num_kv_blocks=40)
    assert llm.core.kv_cache.sliding_window == TEST_WINDOW
    assert llm.runner.attention_backend == backend
    outputs = llm.generate(prompts, GREEDY_LONG)
    for prompt, out in zip(prompts, outputs, strict=True):
        assert len(out.token_ids) == NUM_NEW
        assert_transformers_greedy(reference_model, prompt, out.token_ids)
    # All ten ran side by side: no preemption, and about as many steps as one request's
    # decode (serially it would take ten times as many).
    assert llm.core.scheduler.num_preemptions == 0
    assert llm.core.num_steps < 2 * NUM_NEW
    llm.core.scheduler.check_invariants()
    assert llm.core.kv_cache.pool.num_free_blocks == llm.core.kv_cache.num_blocks


@pytest.mark.parametrize("backend", ["cpu_paged", "torch"])
def test_prefix_hit_past_the_window_stays_exact(
    window_dir: Path, reference_model: torch.nn.Module, backend: str
) -> None:
    llm = window_llm(window_dir, backend, num_kv_blocks=64)
    first_prompt = FIRST_PROMPT
    first = llm.generate([first_prompt], GREEDY_LONG)[0]
    # A follow-up over the first request's prompt and 30 of its tokens (12 full blocks, most
    # of them behind the window and given back while it ran, but still cached), plus others
    # in the same batch.
    follow_up = first_prompt + first.token_ids[:30] + [5, 6]
    others = OTHER_PROMPTS
    outputs = llm.generate([follow_up, *others], GREEDY_LONG)
    assert outputs[0].num_cached_tokens == 48
    assert_transformers_greedy(reference_model, first_prompt, first.token_ids)
    for prompt, out in zip([follow_up, *others], outputs, strict=True):
        assert_transformers_greedy(reference_model, prompt, out.token_ids)
    llm.core.scheduler.check_invariants()
    assert llm.core.kv_cache.pool.num_free_blocks == llm.core.kv_cache.num_blocks
