"""LoRA with tensor parallelism (two rank processes over loopback gloo): each rank holds its
share of every adapter (column-parallel B rows, row-parallel A columns), and a batch mixing
two adapters with base-model rows, through chunked prefill and an adapter slot reused,
gives one process's tokens and peft's; LoRA with pipeline stages is refused naming the
flags."""
from __future__ import annotations

from pathlib import Path

import pytest
from greedy_reference import GREEDY, assert_transformers_greedy, make_peaked_model, prompts_from
from lora_adapters import make_adapter, peft_reference
from transformers import AutoModelForCausalLM

from engine.config import LoRAConfig
from engine.frontend.llm import LLM
from engine.lora.request import LoRARequest

# Two processes (torch import, model load): the slow tier.
pytestmark = pytest.mark.slow

ADAPTERS = {  # attention only; every projection, the row-parallel o_proj / down_proj too
    "qkv": dict(rank=4, targets=["q_proj", "k_proj", "v_proj"], seed=1),
    "all": dict(rank=8, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                 "up_proj", "down_proj"], seed=3, alpha=32),
}


def test_two_adapters_mixed_at_two_ranks_equal_one_rank_and_peft(tmp_path: Path) -> None:
    base_dir = make_peaked_model(tmp_path / "base", "llama")  # 4 heads, 2 KV heads
    adapters = {name: LoRARequest(name, index + 1, str(make_adapter(base_dir, tmp_path / name,
                                                                    **spec)))
                for index, (name, spec) in enumerate(ADAPTERS.items())}
    prompts = prompts_from(5, [3, 17, 6, 30, 12, 1])
    names = [None, "qkv", "all", "all", "qkv", None]
    loras = [adapters[n] if n else None for n in names]

    def run(tp: int) -> list[list[int]]:
        with LLM(str(base_dir), dtype="float32", max_num_batched_tokens=24,
                 tensor_parallel_size=tp, lora=LoRAConfig(max_loras=2, max_lora_rank=8)) as llm:
            mixed = llm.generate(prompts, GREEDY, lora_requests=loras)
            # One slot's adapter swapped for a third load of the same slots: reloaded alike.
            again = llm.generate(prompts[:2], GREEDY, lora_requests=[adapters["all"]] * 2)
            return [o.token_ids for o in mixed + again]

    one_rank, two_ranks = run(1), run(2)
    assert two_ranks == one_rank
    base = AutoModelForCausalLM.from_pretrained(base_dir).float().eval()
    references = {n: peft_reference(base_dir, Path(a.path), merged=False)
                  for n, a in adapters.items()}
    for prompt, name, tokens in zip(prompts + prompts[:2], names + ["all", "all"], two_ranks,
                                    strict=True):
        assert_transformers_greedy(base if name is None else references[name], prompt, tokens)
    assert two_ranks[1] != two_ranks[7], "the adapters agree: a vacuous comparison"


def test_lora_with_pipeline_stages_is_refused(tmp_path: Path) -> None:
    base_dir = make_peaked_model(tmp_path / "base", "llama")
    with pytest.raises(ValueError, match="--enable-lora is not supported with --pipeline-parallel-size"):
        LLM(str(base_dir), dtype="float32", pipeline_parallel_size=2,
            lora=LoRAConfig(max_loras=1, max_lora_rank=8))
