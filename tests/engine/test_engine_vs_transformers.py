"""The whole engine (scheduler + KV cache + runner + sampler) against transformers' greedy
`generate`, with requests batched concurrently, chunked, sharing prefixes and preempted."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from engine.llm import LLM
from engine.sampling_params import SamplingParams

NUM_NEW_TOKENS = 32
VOCAB = 384


def _make_model(path: Path, arch: str) -> Path:
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(**common, tie_word_embeddings=False)
    elif arch == "mistral":
        config = MistralConfig(**common, sliding_window=None, tie_word_embeddings=True)
    else:
        config = Qwen2Config(**common, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Larger-than-default weights give peaked logits, so greedy ties cannot flip.
        for param in model.parameters():
            param.normal_(0.0, 0.15 if param.dim() > 1 else 0.3)
    model.save_pretrained(path)
    return path


def _reference(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=NUM_NEW_TOKENS, min_new_tokens=NUM_NEW_TOKENS, pad_token_id=0,
            )
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


def _prompts(seed: int, lengths: list[int], shared_prefix: list[int] | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = shared_prefix or []
    return [prefix + [rng.randrange(1, VOCAB) for _ in range(n)] for n in lengths]


GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_concurrent_greedy_equals_transformers(tmp_path: Path, arch: str) -> None:
    model_dir = _make_model(tmp_path / arch, arch)
    prompts = _prompts(1, [1, 3, 7, 16, 17, 33, 60, 95])
    # A small token budget forces chunked prefill mixed with decodes of other requests.
    llm = LLM(str(model_dir), dtype="float32", max_num_batched_tokens=40, num_kv_blocks=128)
    outputs = llm.generate(prompts, GREEDY)
    expected = _reference(model_dir, prompts)
    for i, (out, ref) in enumerate(zip(outputs, expected)):
        assert out.token_ids == ref, f"prompt {i} (len {len(prompts[i])}) diverged"
    llm.core.scheduler.check_invariants()
    assert llm.core.kv_cache.pool.num_free_blocks == llm.core.kv_cache.num_blocks


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_model(tmp_path_factory.mktemp("llama"), "llama")


def test_shared_prefixes_and_preemption_keep_outputs(llama_dir: Path) -> None:
    system = _prompts(7, [48])[0]
    prompts = _prompts(2, [random.Random(i).randrange(1, 30) for i in range(64)], system)
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
    prompt = _prompts(3, [70])[0]
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
    prompt = _prompts(4, [12])[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate([prompt], seeded)[0].token_ids
    others = _prompts(5, [5, 9, 14, 20, 3, 8, 30])
    mixed_params = [SamplingParams(temperature=0.8, max_tokens=24, seed=None)] * len(others)
    batch = llm.generate([*others, prompt], [*mixed_params, seeded])
    assert batch[-1].token_ids == alone
    different_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=24, ignore_eos=True)
    assert llm.generate([prompt], different_seed)[0].token_ids != alone
