"""Tensor and pipeline parallelism (separate rank processes over loopback gloo, the multi-node
code path) give exactly the greedy tokens of one process and of transformers, for dense, GQA
with KV heads replicated (4 ranks, 2 KV heads), q/k-normed, soft-capped sliding-window,
fused-checkpoint, tied-head and mixture-of-experts families, with chunked prefill, prefix
caching and preemption; pipeline stages split steps into micro-batches (one per stage, an
odd count, or none) with the same tokens."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from family_configs import FAMILIES
from greedy_reference import (
    GREEDY,
    assert_concurrent_greedy_matches,
    make_peaked_model,
    prompts_from,
)

from engine.distributed.pipeline import PipelineCounters
from engine.frontend.llm import LLM

# Each case starts 1-3 rank processes (torch import, model load): the slow tier.
pytestmark = pytest.mark.slow


def _llm(model_dir: Path, tp: int, pp: int = 1, micro_batches: int | None = None,
         kv_cache_dtype: str = "auto") -> LLM:
    # A small token budget forces chunked prefill mixed with decodes; 24 blocks of 8 cannot
    # hold all seven prompts at once and force preemption (as test_engine_vs_transformers).
    # Micro-batches of any size, so these small steps split.
    return LLM(str(model_dir), dtype="float32", max_num_batched_tokens=40, num_kv_blocks=24,
               block_size=8, tensor_parallel_size=tp, pipeline_parallel_size=pp,
               pipeline_micro_batches=micro_batches, pipeline_micro_batch_min_tokens=1,
               kv_cache_dtype=kv_cache_dtype)


CASES = [  # (family, tensor-parallel size, pipeline stages, micro-batches: None one per stage)
    # Every family at two ranks and at four (KV heads replicated: 2 KV heads); GPT-OSS has no
    # sharding rules for its sinks and checkpoint-layout experts yet and is refused at
    # --tensor-parallel-size > 1 (engine/models/decoder.py).
    *[(arch, tp, 1, None) for arch in FAMILIES if arch != "gpt_oss" for tp in (2, 4)],
    ("llama", 1, 2, None), ("gemma2", 1, 2, 3),
    ("mistral", 1, 2, 1),  # mistral: a tied LM head; steps pass whole
    ("qwen3_moe", 2, 2, None),  # 4 processes: two stages of two tensor-parallel ranks
]
# Two prompts share a 16-token prefix (cached by a first request), five stand alone.
PREFIX = prompts_from(7, [16])[0]
PROMPTS = prompts_from(2, [3, 20], PREFIX) + prompts_from(1, [1, 7, 17, 33, 60])


@pytest.fixture(scope="module")
def one_rank_reference(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str], tuple[Path, list[list[int]]]]:
    """`one_rank_reference(arch)`: the family's peaked checkpoint and one process's greedy
    tokens for PROMPTS, built on the family's first case and reused by its other sizes (the
    same checkpoint and prompts give the same tokens; only the parallel run differs)."""
    built: dict[str, tuple[Path, list[list[int]]]] = {}

    def get(arch: str) -> tuple[Path, list[list[int]]]:
        if arch not in built:
            model_dir = make_peaked_model(tmp_path_factory.mktemp(arch) / arch, arch)
            with _llm(model_dir, 1) as single:
                built[arch] = model_dir, [o.token_ids for o in single.generate(PROMPTS, GREEDY)]
        return built[arch]

    return get


@pytest.mark.parametrize(("arch", "tp", "pp", "micro_batches"), CASES)
def test_model_parallel_equals_one_rank_and_transformers(
    one_rank_reference: Callable[[str], tuple[Path, list[list[int]]]], arch: str, tp: int,
    pp: int, micro_batches: int | None,
) -> None:
    model_dir, expected = one_rank_reference(arch)
    with _llm(model_dir, tp, pp, micro_batches) as llm:
        llm.generate([PREFIX + [5]], GREEDY)  # caches the shared prefix
        PipelineCounters.reset()  # stage 0 runs in this process
        outputs = assert_concurrent_greedy_matches(llm, model_dir, PROMPTS)
        assert [o.num_cached_tokens for o in outputs[:2]] == [16, 16]
        assert llm.core.scheduler.num_preemptions > 0
        if pp > 1 and arch != "gemma2":  # (Gemma 2's two layers share one slot: S F groups)
            # Stage 0 holds layer 0 only: the last layer's cache slot is empty here.
            assert llm.runner.kv_caches[-1].numel() == 0 < llm.runner.kv_caches[0].numel()
        if pp > 1 and micro_batches != 1:
            # Steps did split, into micro-batches of decodes alone, of prefills alone, mixed.
            counted = PipelineCounters
            assert counted.split_steps > 0
            assert min(counted.prefill_only, counted.decode_only, counted.mixed) > 0
        if pp > 1 and micro_batches == 1:
            assert PipelineCounters.split_steps == 0
    assert [o.token_ids for o in outputs] == expected


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)])
def test_int8_kv_cache_splits_across_ranks(tmp_path: Path, tp: int, pp: int) -> None:
    """Each rank quantizes the rows of its own KV heads (or layers) as one process would
    (one scale per token and head): the tokens of one rank with the same int8 cache."""
    model_dir = make_peaked_model(tmp_path / "llama", "llama")
    prefix = prompts_from(7, [16])[0]
    prompts = prompts_from(2, [3, 20], prefix) + prompts_from(1, [1, 7, 17, 33, 60])
    with _llm(model_dir, 1, kv_cache_dtype="int8") as single:
        single.generate([prefix + [5]], GREEDY)
        expected = [o.token_ids for o in single.generate(prompts, GREEDY)]
    with _llm(model_dir, tp, pp, kv_cache_dtype="int8") as llm:
        llm.generate([prefix + [5]], GREEDY)  # caches the shared prefix
        outputs = llm.generate(prompts, GREEDY)
        assert [o.num_cached_tokens for o in outputs[:2]] == [16, 16]
        assert llm.core.scheduler.num_preemptions > 0
        assert llm.runner.kv_caches[0].dtype == torch.int8
    assert [o.token_ids for o in outputs] == expected
