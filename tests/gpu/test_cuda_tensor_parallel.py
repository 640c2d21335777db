"""Tensor parallelism over NCCL, one CUDA device per rank: the greedy tokens of one rank and
of transformers (float32, chunked prefill, a shared prefix, preemption). Skipped with fewer
than two devices; tests/engine/distributed covers gloo on the CPU."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from greedy_reference import (
    GREEDY,
    assert_concurrent_greedy_matches,
    make_peaked_model,
    prompts_from,
)

from engine.frontend.llm import LLM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_two_cuda_ranks_equal_one_and_transformers(tmp_path: Path, arch: str) -> None:
    model_dir = make_peaked_model(tmp_path / arch, arch)
    prompts = prompts_from(2, [3, 20], prompts_from(7, [16])[0]) + prompts_from(1, [1, 33, 60])
    options = dict(dtype="float32", device="cuda", max_num_batched_tokens=40, num_kv_blocks=24,
                   block_size=8)
    with LLM(str(model_dir), **options) as single:
        expected = [o.token_ids for o in single.generate(prompts, GREEDY)]
    with LLM(str(model_dir), tensor_parallel_size=2, **options) as llm:
        outputs = assert_concurrent_greedy_matches(llm, model_dir, prompts)
    assert [o.token_ids for o in outputs] == expected
