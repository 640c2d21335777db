"""Scheduler over a KV cache that gives back blocks behind a sliding window. The scripted
runner checks every step's windowed context against the blocks it is told to read (and that
nothing reads or writes the null block), so reuse of given-back blocks is verified, not just
counted."""
from __future__ import annotations

import random

import pytest
import test_scheduler_random as random_workload

from engine.core.request import FinishReason
from scheduler_harness import Harness, expected_tokens, make_request, prompt

BS = 4
W = 8
STEADY_BLOCKS = -(-W // BS) + 1


def held(h: Harness) -> dict[str, int]:
    return {r.request_id: h.kv_cache.num_held_blocks(r) for r in h.scheduler.running}


def test_a_long_generation_stops_growing_past_the_window() -> None:
    windowed = Harness(block_size=BS, num_blocks=64, sliding_window=W)
    plain = Harness(block_size=BS, num_blocks=64)
    for h in (windowed, plain):
        h.add(make_request("a", prompt(10), max_tokens=70))
    most_held = {"windowed": 0, "plain": 0}
    while windowed.scheduler.has_unfinished_requests:
        windowed.step()
        plain.step()
        if windowed.scheduler.running:
            most_held["windowed"] = max(most_held["windowed"], held(windowed)["a"])
            most_held["plain"] = max(most_held["plain"], held(plain)["a"])
    # The prompt's step holds its 3 blocks, decoding at most the window's.
    assert most_held["windowed"] == STEADY_BLOCKS
    assert most_held["plain"] == -(-(10 + 70 - 1) // BS)
    for h in (windowed, plain):
        assert h.results["a"].tokens == expected_tokens("a", 10, 70)
        assert h.results["a"].finish_reason == FinishReason.LENGTH
        h.assert_drained()


def test_requests_that_together_overflow_the_cache_run_side_by_side() -> None:
    # 13 usable blocks: each request alone would need 20 of them without the give-back.
    h = Harness(block_size=BS, num_blocks=14, sliding_window=W)
    for i in range(4):
        h.add(make_request(f"r{i}", prompt(9, start=10 + 20 * i), max_tokens=70))
    owners: dict[int, set[str]] = {}
    while h.scheduler.has_unfinished_requests:
        h.step()
        for request in h.scheduler.running:
            for block_id in h.kv_cache.held_block_ids(request):
                owners.setdefault(block_id, set()).add(request.request_id)
        if h.scheduler.running:
            assert max(held(h).values()) <= STEADY_BLOCKS
    h.record(h.scheduler.take_pending_outputs())
    assert h.scheduler.num_preemptions == 0
    assert h.batches[0].num_scheduled_tokens == 4 * 9  # all four admitted at once
    # Blocks given back by one request went on to serve others.
    assert sum(1 for ids in owners.values() if len(ids) > 1) >= 4
    for i in range(4):
        assert h.results[f"r{i}"].tokens == expected_tokens(f"r{i}", 9, 70)
    h.assert_drained()


def test_a_prompt_longer_than_the_cache_runs_in_shorter_chunks() -> None:
    # 5 usable blocks = 20 slots; the 45-token prompt would end with `length` unwindowed.
    h = Harness(block_size=BS, num_blocks=6, sliding_window=W)
    h.add(make_request("a", prompt(45), max_tokens=10))
    h.run()
    steps = [s for s in h.schedule_of("a") if s is not None]
    # Chunks end where the held blocks (from the first visible one) fill the cache.
    assert steps[:4] == [(0, 20, False), (20, 12, False), (32, 12, False), (44, 1, True)]
    assert h.results["a"].tokens == expected_tokens("a", 45, 10)
    h.assert_drained()
    plain = Harness(block_size=BS, num_blocks=6)
    plain.add(make_request("a", prompt(45), max_tokens=10))
    plain.run()
    assert plain.results["a"].finish_reason == FinishReason.LENGTH
    assert plain.results["a"].tokens == []


def test_a_window_wider_than_the_cache_ends_the_request() -> None:
    h = Harness(block_size=BS, num_blocks=3, sliding_window=W)  # 2 usable blocks
    h.add(make_request("a", prompt(5), max_tokens=20))
    h.run()
    # Positions up to 8 fit two blocks; the query at 9 sees from 2 on: three blocks.
    assert h.results["a"].finish_reason == FinishReason.LENGTH
    assert h.results["a"].tokens == expected_tokens("a", 5, 4)
    h.assert_drained()


def test_prefix_hits_stay_exact_after_the_first_request_gave_blocks_back() -> None:
    h = Harness(block_size=BS, num_blocks=64, sliding_window=W)
    h.add(make_request("a", prompt(12), max_tokens=30))
    h.run()
    shared = prompt(12) + h.results["a"].tokens[:20]  # a's first 32 tokens: 8 full blocks
    h.add(make_request("b", shared + [7, 8, 9], max_tokens=20))
    h.run()
    first = next(s for s in h.schedule_of("b") if s is not None)
    assert first == (32, 3, True)
    assert h.results["b"].outputs[0].num_cached_tokens == 32
    assert h.results["b"].tokens == expected_tokens("b", 35, 20)
    h.assert_drained()


def test_preemption_under_pressure_keeps_outputs_exact() -> None:
    h = Harness(block_size=BS, num_blocks=8, sliding_window=W, max_num_batched_tokens=16)
    for i in range(5):
        h.add(make_request(f"r{i}", prompt(6 + i, start=10 + 20 * i), max_tokens=40))
    h.run()
    assert h.scheduler.num_preemptions > 0
    for i in range(5):
        assert h.results[f"r{i}"].tokens == expected_tokens(f"r{i}", 6 + i, 40)
    h.assert_drained()


@pytest.mark.parametrize("seed", range(30))
def test_random_windowed_workload_matches_reference(seed: int) -> None:
    """test_scheduler_random's workloads, longer, on a windowed cache that always holds the
    window: no request ends for capacity however long it runs."""
    rng = random.Random(1000 + seed)
    policy = rng.choice(["fcfs", "priority"])
    block_size = rng.choice([1, 2, 4, 8])
    window = rng.randint(1, 24)
    window_blocks = -(-(window - 1) // block_size) + 1
    num_blocks = window_blocks + 1 + rng.randint(0, 48 // block_size)
    max_model_len = rng.randint(20, 120)
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
        sliding_window=window,
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
