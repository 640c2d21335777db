"""Expert parallelism (`--enable-expert-parallel`: whole experts per tensor-parallel rank,
separate rank processes over loopback gloo) gives exactly the greedy tokens of one process
and of transformers for Qwen3-MoE (8 experts, a dense layer beside the sparse one) and
Mixtral (4 experts, one per rank at four ranks), with chunked prefill, prefix caching and
preemption as the tensor-parallel cases."""
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

# Each case starts 2-4 rank processes (torch import, model load): the slow tier.
pytestmark = pytest.mark.slow

PREFIX = prompts_from(7, [16])[0]
PROMPTS = prompts_from(2, [3, 20], PREFIX) + prompts_from(1, [1, 7, 17, 33, 60])


def _llm(model_dir: Path, tp: int, expert_parallel: bool) -> LLM:
    # As test_tensor_parallel_greedy: a small token budget (chunked prefill) and 24 blocks
    # of 8 (preemption).
    return LLM(str(model_dir), dtype="float32", max_num_batched_tokens=40, num_kv_blocks=24,
               block_size=8, tensor_parallel_size=tp, enable_expert_parallel=expert_parallel)


@pytest.mark.parametrize(("arch", "tp"), [("qwen3_moe", 2), ("mixtral", 2), ("mixtral", 4)])
def test_expert_parallel_equals_one_rank_and_transformers(
    tmp_path: Path, arch: str, tp: int
) -> None:
    model_dir = make_peaked_model(tmp_path / arch, arch)
    with _llm(model_dir, 1, expert_parallel=False) as single:
        single.generate([PREFIX + [5]], GREEDY)
        expected = [o.token_ids for o in single.generate(PROMPTS, GREEDY)]
    with _llm(model_dir, tp, expert_parallel=True) as llm:
        experts = llm.runner.loaded.model.model.layers[0].mlp.experts
        # Rank 0 holds its contiguous share of whole experts, each at full width.
        held = experts.routing.num_experts // tp
        assert (experts.first_expert, experts.num_experts) == (0, held)
        assert experts.intermediate_size == llm.runner.loaded.model.dims.moe.intermediate_size
        llm.generate([PREFIX + [5]], GREEDY)  # caches the shared prefix
        outputs = assert_concurrent_greedy_matches(llm, model_dir, PROMPTS)
        assert [o.num_cached_tokens for o in outputs[:2]] == [16, 16]
        assert llm.core.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outputs] == expected
