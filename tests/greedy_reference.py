"""Peaked random models and transformers' greedy `generate` as the reference, shared by the
engine-vs-transformers tests on CPU (tests/engine) and on CUDA (tests/gpu)."""
from __future__ import annotations

import random
from pathlib import Path

import torch
from family_configs import family_config
from transformers import AutoModelForCausalLM

from engine.sampling_params import SamplingParams

NUM_NEW_TOKENS = 32
VOCAB = 384
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)


def make_peaked_model(path: Path, arch: str) -> Path:
    """A 2-layer float32 checkpoint of family `arch` (tests/family_configs.py) whose logits
    are peaked enough that greedy ties cannot flip between implementations."""
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(0)
    # Mistral with a tied head, the others untied: both LM-head paths stay covered.
    config = family_config(arch, **common, tie_word_embeddings=arch == "mistral")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Larger-than-default weights give peaked logits, so greedy ties cannot flip.
        for param in model.parameters():
            param.normal_(0.0, 0.15 if param.dim() > 1 else 0.3)
    model.save_pretrained(path)
    return path


def transformers_greedy(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    """NUM_NEW_TOKENS greedy tokens per prompt from transformers on the CPU in float32."""
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


def assert_transformers_greedy(model: torch.nn.Module, prompt: list[int],
                               tokens: list[int]) -> None:
    """`tokens` are transformers' greedy continuation of `prompt`: one forward of `model`
    over the whole sequence must pick each of them at the position before it. By induction
    that is exactly what `generate` would produce, at a fraction of its cost."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids, attention_mask=torch.ones_like(ids)).logits[0]
    greedy = logits[len(prompt) - 1 : -1].argmax(dim=-1).tolist()
    first_diff = next((i for i, (a, b) in enumerate(zip(greedy, tokens)) if a != b), None)
    assert first_diff is None, f"prompt of {len(prompt)}: token {first_diff} is not greedy"


def assert_concurrent_greedy_matches(llm, model_dir: Path, prompts: list[list[int]]) -> list:
    """All prompts through `llm` at once give transformers' greedy tokens for each alone, and
    the engine ends with its invariants intact and every KV block free."""
    outputs = llm.generate(prompts, GREEDY)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outputs, strict=True):
        assert len(out.token_ids) == NUM_NEW_TOKENS
        assert_transformers_greedy(model, prompt, out.token_ids)
    llm.core.scheduler.check_invariants()
    assert llm.core.kv_cache.pool.num_free_blocks == llm.core.kv_cache.num_blocks
    return outputs


def prompts_from(seed: int, lengths: list[int],
                 shared_prefix: list[int] | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = shared_prefix or []
    return [prefix + [rng.randrange(1, VOCAB) for _ in range(n)] for n in lengths]
