"""Multi-LoRA against peft: every adapter's greedy tokens equal peft's (unmerged PeftModel and
merge_and_unload, float32), alone and with the base model and other adapters in one batch."""
from __future__ import annotations

from pathlib import Path

import pytest
from greedy_reference import GREEDY, assert_transformers_greedy, make_peaked_model, prompts_from
from lora_adapters import make_adapter, peft_reference
from transformers import AutoModelForCausalLM

from engine.config import LoRAConfig
from engine.frontend.llm import LLM
from engine.lora.request import LoRARequest

# Different ranks and targets: attention only, MLP only, everything (rsLoRA).
ADAPTERS = {
    "qv": dict(rank=4, targets=["q_proj", "v_proj"], seed=1),
    "mlp": dict(rank=8, targets=["gate_proj", "down_proj"], seed=2, alpha=32),
    "all": dict(rank=16, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                  "up_proj", "down_proj"], seed=3, use_rslora=True),
}


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, LoRARequest]]:
    root = tmp_path_factory.mktemp("lora")
    base_dir = make_peaked_model(root / "base", "llama")
    requests = {
        name: LoRARequest(name, index + 1, str(make_adapter(base_dir, root / name, **spec)))
        for index, (name, spec) in enumerate(ADAPTERS.items())
    }
    return base_dir, requests


def test_each_adapter_alone_equals_peft_unmerged_and_merged(lora_setup) -> None:
    base_dir, adapters = lora_setup
    llm = LLM(str(base_dir), dtype="float32", lora=LoRAConfig(max_loras=1, max_lora_rank=16))
    prompt = prompts_from(11, [9])[0]
    base_tokens = llm.generate([prompt], GREEDY)[0].token_ids
    for name, lora in adapters.items():
        tokens = llm.generate([prompt], GREEDY, lora_requests=lora)[0].token_ids
        assert tokens != base_tokens, f"adapter {name} changed nothing: a vacuous comparison"
        for merged in (False, True):
            assert_transformers_greedy(
                peft_reference(base_dir, Path(lora.path), merged=merged), prompt, tokens)


def test_mixed_batch_with_base_and_three_adapters_equals_peft(lora_setup) -> None:
    base_dir, adapters = lora_setup
    # Three adapter slots and a small token budget: prefill chunks of several adapters mix
    # with decodes of the others in the same steps.
    llm = LLM(str(base_dir), dtype="float32", max_num_batched_tokens=24,
              lora=LoRAConfig(max_loras=3, max_lora_rank=16))
    prompts = prompts_from(5, [3, 17, 6, 30, 12, 1, 20, 8])
    names = [None, "qv", "mlp", "all", "all", "qv", None, "mlp"]
    loras = [adapters[n] if n else None for n in names]
    outputs = llm.generate(prompts, GREEDY, lora_requests=loras)
    base = AutoModelForCausalLM.from_pretrained(base_dir).float().eval()
    references = {n: peft_reference(base_dir, Path(a.path), merged=False)
                  for n, a in adapters.items()}
    for prompt, name, out in zip(prompts, names, outputs, strict=True):
        model = base if name is None else references[name]
        assert_transformers_greedy(model, prompt, out.token_ids)
    llm.core.scheduler.check_invariants()


def test_more_adapters_than_slots_take_turns(lora_setup) -> None:
    """One slot, three adapters and the base: the scheduler holds back the other adapters'
    requests until the slot's adapter has no running request, and slots are reloaded."""
    base_dir, adapters = lora_setup
    llm = LLM(str(base_dir), dtype="float32",
              lora=LoRAConfig(max_loras=1, max_lora_rank=16, max_cpu_loras=2))
    prompt = prompts_from(2, [10])[0]
    alone = {n: llm.generate([prompt], GREEDY, lora_requests=a)[0].token_ids
             for n, a in adapters.items()}
    names = ["all", "qv", "mlp", "qv", "all"]
    outputs = llm.generate([prompt] * 5, GREEDY, lora_requests=[adapters[n] for n in names])
    assert [o.token_ids for o in outputs] == [alone[n] for n in names]


def test_prefix_cache_not_shared_across_adapters(lora_setup) -> None:
    base_dir, adapters = lora_setup
    llm = LLM(str(base_dir), dtype="float32", block_size=8,
              lora=LoRAConfig(max_loras=2, max_lora_rank=16))
    prompt = prompts_from(9, [33])[0]
    first = llm.generate([prompt], GREEDY, lora_requests=adapters["qv"])[0]
    again = llm.generate([prompt], GREEDY, lora_requests=adapters["qv"])[0]
    other = llm.generate([prompt], GREEDY, lora_requests=adapters["all"])[0]
    base = llm.generate([prompt], GREEDY)[0]
    assert (first.num_cached_tokens, again.num_cached_tokens) == (0, 32)
    assert again.token_ids == first.token_ids
    # Same tokens, other adapter (or none): its KV differs, so nothing may be reused.
    assert other.num_cached_tokens == 0 and base.num_cached_tokens == 0
    assert_transformers_greedy(
        peft_reference(base_dir, Path(adapters["all"].path), merged=True), prompt,
        other.token_ids)
