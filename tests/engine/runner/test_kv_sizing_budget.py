"""The CUDA KV budget behind --gpu-memory-utilization: the arithmetic over a memory profile
and the worst-case steps the profiling pass runs (the device query itself only runs on GPU
machines: tests/gpu/test_cuda_engine.py)."""
from __future__ import annotations

import pytest
import torch

from engine.config import CacheConfig, ModelConfig
from engine.runner.kv_memory import needs_memory_profile
from engine.runner.memory_profile import MemoryProfile, profile_batches, profile_num_blocks
from engine.runner.model_runner import ModelRunner

GIB = 1024**3
SLACK = 256 * 1024**2


def test_budget_is_the_allowed_share_minus_everything_else_the_process_holds() -> None:
    # 80 GiB device, 90% allowed: 2 GiB outside torch, 16 GiB weights, 3 GiB peak activations.
    profile = MemoryProfile(total_bytes=80 * GIB, weights_bytes=16 * GIB,
                            peak_activation_bytes=3 * GIB, non_torch_bytes=2 * GIB)
    assert profile.kv_cache_budget(0.9) == int(72 * GIB) - 21 * GIB - SLACK
    assert "KV cache budget" in profile.describe(0.9)


def test_budget_never_goes_negative() -> None:
    profile = MemoryProfile(total_bytes=16 * GIB, weights_bytes=15 * GIB,
                            peak_activation_bytes=GIB, non_torch_bytes=GIB)
    assert profile.kv_cache_budget(0.5) == 0


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5])
def test_utilization_outside_the_unit_interval_is_rejected(value: float) -> None:
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        CacheConfig(gpu_memory_utilization=value)


def test_only_cuda_without_an_explicit_size_is_profiled() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert needs_memory_profile(CacheConfig(), cuda)
    assert not needs_memory_profile(CacheConfig(kv_cache_memory=GIB), cuda)
    assert not needs_memory_profile(CacheConfig(num_blocks=64), cuda)
    assert not needs_memory_profile(CacheConfig(), cpu)


@pytest.mark.parametrize(
    ("tokens", "seqs", "model_len", "block"), [(2048, 256, 4096, 16), (512, 4, 100, 32), (8, 64, 2048, 16)]
)
def test_profile_batches_are_the_worst_steps_the_scheduler_may_form(
    tokens: int, seqs: int, model_len: int, block: int
) -> None:
    longest, widest = profile_batches(max_num_batched_tokens=tokens, max_num_seqs=seqs,
                                      max_model_len=model_len, block_size=block)
    assert [r.num_tokens for r in longest.requests] == [min(tokens, model_len)]
    assert len(widest.requests) == min(seqs, tokens)
    for batch in (longest, widest):
        assert batch.num_scheduled_tokens == sum(r.num_tokens for r in batch.requests) <= tokens
        assert all(r.sample and r.start == 0 and r.num_tokens <= model_len for r in batch.requests)
        blocks = [b for r in batch.requests for b in r.block_ids]
        # Distinct blocks, each request covered, all inside the profile cache.
        assert len(blocks) == len(set(blocks))
        assert all(len(r.block_ids) * block >= r.num_tokens for r in batch.requests)
        assert max(blocks) < profile_num_blocks([longest, widest])


def test_the_runner_executes_the_profile_steps(tiny_llama_dir) -> None:
    """The profiling pass is the runner's own step: on CPU (no memory stats) it must still run
    both worst-case batches and sample one token per sequence."""
    runner = ModelRunner(ModelConfig(str(tiny_llama_dir), dtype="float32", device="cpu"),
                         CacheConfig(num_blocks=4), max_num_seqs=8)
    batches = profile_batches(max_num_batched_tokens=96, max_num_seqs=8,
                              max_model_len=runner.loaded.max_model_len, block_size=16)
    runner.kv_caches = [torch.zeros((2, profile_num_blocks(batches), *c.shape[2:]), dtype=c.dtype)
                        for c in runner.kv_caches]
    for batch in batches:
        output = runner.execute(batch)
        assert output.request_ids == [r.request_id for r in batch.requests]
        vocab = runner.loaded.vocab_size
        assert all(0 <= token < vocab for token in output.sampled_token_ids)
