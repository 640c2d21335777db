"""Scheduler over a KV cache with several groups, full-attention ones and windowed ones
(Gemma 2/3's layout): every group has its own block table, and the scripted runner checks
each group's reads against what that group wrote to the blocks it is told to read, so a block
shared by two groups, a hit block one group lost, or a given-back block read again fails the
step. Workloads as in test_scheduler_random, with prefix sharing and preemption."""
from __future__ import annotations

import random

import pytest
import test_scheduler_random as random_workload

from engine.kv_cache.groups import blocks_per_request
from scheduler_harness import Harness, expected_tokens, make_request, prompt

BS = 4
W = 8


def test_preemption_and_shared_prefixes_keep_outputs_exact() -> None:
    windows = (None, W, W)
    h = Harness(block_size=BS, num_blocks=40, group_windows=windows, max_num_batched_tokens=16)
    shared = prompt(20)
    for i in range(6):
        tail = prompt(3 + i, start=100 + 10 * i)
        h.add(make_request(f"r{i}", shared + tail, max_tokens=40))
    h.run()
    assert h.scheduler.num_preemptions > 0
    assert any(r.outputs[0].num_cached_tokens >= 20 for r in h.results.values())
    for i in range(6):
        assert h.results[f"r{i}"].tokens == expected_tokens(f"r{i}", 23 + i, 40)
    h.assert_drained()


@pytest.mark.parametrize("seed", range(30))
def test_random_hybrid_workload_matches_reference(seed: int) -> None:
    """A cache that holds one request of the full model length (its full groups' blocks and
    its windowed groups' windows): no request ends for capacity, however the others crowd it."""
    rng = random.Random(2000 + seed)
    policy = rng.choice(["fcfs", "priority"])
    block_size = rng.choice([1, 2, 4, 8])
    window = rng.randint(1, 24)
    windows = (None,) * rng.randint(1, 2) + (window,) * rng.randint(1, 3)
    max_model_len = rng.randint(20, 120)
    needed = blocks_per_request(windows, max_model_len, block_size)
    num_blocks = needed + 1 + rng.randint(0, 64 // block_size)
    script = random_workload.make_script(seed)
    h = Harness(
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_seqs=rng.randint(1, 6),
        max_num_batched_tokens=rng.randint(1, 32),
        policy=policy,
        max_model_len=max_model_len,
        script=script,
        enable_prefix_caching=rng.random() < 0.8,
        group_windows=windows,
    )
    specs = random_workload.random_specs(rng, max_model_len, policy)
    for spec in specs:
        h.add(make_request(
            spec.request_id, spec.prompt, max_tokens=spec.max_tokens * 4,
            min_tokens=spec.min_tokens, ignore_eos=spec.ignore_eos,
            stop_token_ids=spec.stop_token_ids, priority=spec.priority,
            cache_salt=spec.cache_salt,
        ))
    h.run(max_steps=5000)
    for spec in specs:
        longer = random_workload.Spec(**{**spec.__dict__, "max_tokens": spec.max_tokens * 4})
        tokens, reason, stop_token_id = random_workload.reference(
            longer, script, max_model_len, capacity=10**9
        )
        result = h.results[spec.request_id]
        assert (result.tokens, result.finish_reason, result.stop_token_id) == (
            tokens, reason, stop_token_id,
        ), spec
    h.assert_drained()
