"""Scheduler over a shared and scarce KV pool: prefix-cache hits, preemption by recompute, and
requests that can never fit. The scripted runner checks that every step's context is really in
the blocks it is told to read, so sharing and recomputation are verified, not just counted."""
from __future__ import annotations

import pytest

from engine.core.request import FinishReason, Request
from scheduler_harness import Harness, expected_tokens, make_request, prompt, run_alone

BS = 4


# ----- prefix caching --------------------------------------------------------------------


def test_shared_full_blocks_are_not_recomputed() -> None:
    h = Harness(block_size=BS)
    h.add(make_request("a", prompt(14), max_tokens=3))
    h.step()  # a's prompt is computed; blocks 0-2 are now published
    # First 2 full blocks equal a's, then different tokens.
    h.add(make_request("b", prompt(8) + [90, 91, 92, 93, 94], max_tokens=3))
    h.run()
    assert h.schedule_of("b")[1] == (8, 5, True)
    assert all(o.num_cached_tokens == 8 for o in h.results["b"].outputs)
    assert all(o.num_cached_tokens == 0 for o in h.results["a"].outputs)
    assert h.results["b"].tokens == expected_tokens("b", 13, 3)
    assert h.kv_cache.num_hit_tokens == 8
    assert h.kv_cache.hit_rate == pytest.approx(8 / (14 + 13))
    h.assert_drained()


def test_hit_after_the_first_request_finished() -> None:
    h = Harness(block_size=BS)
    h.add(make_request("a", prompt(12), max_tokens=5))
    h.run()
    # The same prompt, exactly three full blocks: one token must still be computed, so the
    # hit stops one block short.
    h.add(make_request("b", prompt(12), max_tokens=2))
    h.run()
    b_steps = [s for s in h.schedule_of("b") if s is not None]
    assert b_steps[0] == (8, 4, True)
    assert h.results["b"].outputs[0].num_cached_tokens == 8
    assert h.results["b"].tokens == expected_tokens("b", 12, 2)
    h.assert_drained()


def test_generated_tokens_are_cached_too() -> None:
    h = Harness(block_size=BS)
    h.add(make_request("a", prompt(6), max_tokens=7))  # 13 tokens: 3 full blocks
    h.run()
    continuation = prompt(6) + h.results["a"].tokens[:6]  # a's first 12 tokens, then more
    h.add(make_request("b", continuation + [7], max_tokens=1))
    h.run()
    assert [s for s in h.schedule_of("b") if s][0] == (12, 1, True)
    h.assert_drained()


def test_cache_salt_prevents_sharing_between_tenants() -> None:
    h = Harness(block_size=BS)
    h.add(make_request("a", prompt(13), max_tokens=2, cache_salt="tenant-a"))
    h.run()
    h.add(make_request("b", prompt(13), max_tokens=2, cache_salt="tenant-b"))
    h.add(make_request("c", prompt(13), max_tokens=2))
    h.run()
    h.add(make_request("d", prompt(13), max_tokens=2, cache_salt="tenant-a"))
    h.run()
    first = {rid: next(s for s in h.schedule_of(rid) if s) for rid in "bcd"}
    assert first["b"][0] == 0 and first["c"][0] == 0
    assert first["d"][0] == 12
    assert h.results["b"].outputs[0].num_cached_tokens == 0
    assert h.results["d"].outputs[0].num_cached_tokens == 12
    h.assert_drained()


def test_prefix_caching_disabled() -> None:
    h = Harness(block_size=BS, enable_prefix_caching=False)
    h.add(make_request("a", prompt(13), max_tokens=2))
    h.run()
    h.add(make_request("b", prompt(13), max_tokens=2))
    h.run()
    assert next(s for s in h.schedule_of("b") if s) == (0, 13, True)
    assert h.results["b"].outputs[0].num_cached_tokens == 0
    h.assert_drained()


def test_prefix_hit_with_chunked_prefill() -> None:
    h = Harness(block_size=BS, max_num_batched_tokens=5)
    h.add(make_request("a", prompt(9), max_tokens=1))
    h.run()
    h.add(make_request("b", prompt(8) + prompt(12, start=70), max_tokens=2))
    h.run()
    b_steps = [s for s in h.schedule_of("b") if s]
    assert b_steps[:4] == [(8, 5, False), (13, 5, False), (18, 2, True), (20, 1, True)]
    assert h.results["b"].tokens == expected_tokens("b", 20, 2)
    h.assert_drained()


# ----- preemption ------------------------------------------------------------------------


def _pressure_requests() -> list[Request]:
    # 5 blocks each at full length, 15 in all, against a pool of 8.
    return [
        make_request("a", prompt(6), max_tokens=14, arrival_time=0.0),
        make_request("b", prompt(7, start=30), max_tokens=12, arrival_time=1.0),
        make_request("c", prompt(5, start=60), max_tokens=13, arrival_time=2.0),
    ]


@pytest.mark.parametrize("budget", [2048, 5])
def test_preempted_requests_resume_with_unchanged_output(budget: int) -> None:
    h = Harness(block_size=BS, num_blocks=8, max_num_batched_tokens=budget)
    requests = _pressure_requests()
    h.add(*requests)
    h.run()
    assert h.scheduler.num_preemptions > 0
    assert h.scheduler.num_preemptions == sum(r.num_preemptions for r in requests)
    reported = [rid for b in h.batches for rid in b.preempted_request_ids]
    assert len(reported) == h.scheduler.num_preemptions
    for request, alone in zip(requests, map(run_alone, _pressure_requests())):
        result = h.results[request.request_id]
        assert result.tokens == alone.tokens
        assert result.tokens == expected_tokens(
            request.request_id, request.num_prompt_tokens, request.max_tokens
        )
        assert result.finish_reason == FinishReason.LENGTH
    h.assert_drained()


def test_fcfs_preempts_the_newest_running_request_first() -> None:
    h = Harness(block_size=BS, num_blocks=8)
    h.add(*_pressure_requests())
    h.run()
    events = [
        (before, batch)
        for before, batch in zip(h.running_before, h.batches)
        if batch.preempted_request_ids
    ]
    assert events
    first_before, first_batch = events[0]
    assert first_before == ["a", "b", "c"]
    assert first_batch.preempted_request_ids[0] == "c"
    for before, batch in events:
        # Victims come off the end of the running list (arrival order), newest first.
        k = len(batch.preempted_request_ids)
        assert batch.preempted_request_ids == before[::-1][:k]
        # A preempted request is not scheduled in the batch that reports it, and the step
        # admits nobody new.
        assert all(s.request_id in before for s in batch.requests)
    h.assert_drained()


def test_preempted_request_resumes_before_later_arrivals() -> None:
    # max_num_seqs keeps "late" waiting while a, b, c run; c's preemption then puts c back
    # in the queue, where it must go ahead of "late" (it arrived earlier).
    h = Harness(block_size=BS, num_blocks=8, max_num_seqs=3)
    h.add(*_pressure_requests())
    h.add(make_request("late", prompt(1, start=90), max_tokens=1, arrival_time=3.0))
    h.run()
    preempted_at = next(i for i, b in enumerate(h.batches) if "c" in b.preempted_request_ids)
    assert all(s is None for s in h.schedule_of("late")[: preempted_at + 1])
    resumed_at = next(
        i for i, s in enumerate(h.schedule_of("c")) if s is not None and i > preempted_at
    )
    late_first = next(i for i, s in enumerate(h.schedule_of("late")) if s is not None)
    assert late_first >= resumed_at
    assert h.results["late"].tokens == expected_tokens("late", 1, 1)
    h.assert_drained()


def test_a_step_that_preempts_admits_nobody() -> None:
    # Without prefix caching and with a small budget, the victim could be re-admitted at
    # once into the blocks it just gave up; that would only thrash.
    h = Harness(block_size=BS, num_blocks=8, max_num_batched_tokens=4, enable_prefix_caching=False)
    h.add(*_pressure_requests())
    h.run()
    events = [(b, run) for b, run in zip(h.batches, h.running_before) if b.preempted_request_ids]
    assert events
    for batch, before in events:
        kept = set(before) - set(batch.preempted_request_ids)
        assert {s.request_id for s in batch.requests} <= kept
    h.assert_drained()


def test_preemption_keeps_num_cached_tokens_of_first_admission() -> None:
    h = Harness(block_size=BS, num_blocks=8)
    requests = _pressure_requests()
    h.add(*requests)
    h.run()
    preempted = [r for r in requests if r.num_preemptions]
    assert preempted
    for request in preempted:
        assert {o.num_cached_tokens for o in h.results[request.request_id].outputs} == {0}
    h.assert_drained()


def _two_growing(h: Harness) -> None:
    """'old' (low importance, priority 5) runs alone first, then 'new' (priority 0) joins;
    with 4 blocks of 4 tokens they collide when 'old' needs its third block."""
    h.add(make_request("old", prompt(4), max_tokens=10, priority=5, arrival_time=0.0))
    h.step()
    h.add(make_request("new", prompt(4, start=50), max_tokens=10, priority=0, arrival_time=1.0))
    h.run()


@pytest.mark.parametrize(("policy", "victim"), [("fcfs", "new"), ("priority", "old")])
def test_victim_depends_on_policy(policy: str, victim: str) -> None:
    h = Harness(block_size=BS, num_blocks=4, policy=policy)
    _two_growing(h)
    first = next(b for b in h.batches if b.preempted_request_ids)
    assert first.preempted_request_ids == [victim]
    for request_id, start in (("old", 10), ("new", 50)):
        alone = run_alone(make_request(request_id, prompt(4, start=start), max_tokens=10))
        assert h.results[request_id].tokens == alone.tokens
    h.assert_drained()


def test_victim_is_never_a_request_already_in_the_batch() -> None:
    # "old" (priority 5, the least important) is first in the running list and fits this
    # step; "new" (priority 0) then needs a third block. "old" is already in the batch
    # being built, so "new" must preempt itself instead.
    h = Harness(block_size=BS, num_blocks=4, policy="priority")
    h.add(make_request("old", prompt(4), max_tokens=10, priority=5, arrival_time=0.0))
    h.step()
    h.add(make_request("new", prompt(6, start=50), max_tokens=10, priority=0, arrival_time=1.0))
    h.run()
    first = next(b for b in h.batches if b.preempted_request_ids)
    assert first.preempted_request_ids == ["new"]
    assert [s.request_id for s in first.requests] == ["old"]
    assert h.results["old"].tokens == expected_tokens("old", 4, 10)
    assert h.results["new"].tokens == expected_tokens("new", 6, 10)
    h.assert_drained()


# ----- requests that can never fit -------------------------------------------------------


def test_prompt_larger_than_the_pool_finishes_with_length() -> None:
    h = Harness(block_size=BS, num_blocks=4)
    h.add(make_request("huge", prompt(17), max_tokens=5))
    h.add(make_request("ok", prompt(3, start=50), max_tokens=3))
    batch, outputs = h.step()
    assert "huge" in batch.finished_request_ids
    assert h.scheduled(batch, "huge") is None
    huge_out = [o for o in outputs if o.request_id == "huge"]
    assert len(huge_out) == 1 and huge_out[0].finish_reason == FinishReason.LENGTH
    assert huge_out[0].new_token_ids == []
    h.run()
    assert h.results["huge"].tokens == []
    assert h.results["ok"].tokens == expected_tokens("ok", 3, 3)
    h.assert_drained()


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_request_outgrowing_the_pool_finishes_with_length(policy: str) -> None:
    h = Harness(block_size=BS, num_blocks=4, policy=policy)
    h.add(make_request("grows", prompt(10), max_tokens=100, arrival_time=0.0))
    h.add(make_request("other", prompt(3, start=50), max_tokens=10, arrival_time=1.0))
    h.run(max_steps=200)
    # 16 slots hold the KV of positions 0..15; the token sampled at position 16 needs no
    # slot of its own, so the sequence ends at 17 tokens: 7 generated.
    assert h.results["grows"].tokens == expected_tokens("grows", 10, 7)
    assert h.results["grows"].finish_reason == FinishReason.LENGTH
    assert h.results["other"].tokens == expected_tokens("other", 3, 10)
    h.assert_drained()


def test_outgrowing_request_is_finished_without_preempting_others() -> None:
    # 6 blocks of 4 slots: "grows" ends at 25 tokens (15 generated). When it would need a
    # seventh block no preemption can help, so it must not preempt anyone, itself included.
    h = Harness(block_size=BS, num_blocks=6)
    h.add(make_request("grows", prompt(10), max_tokens=100, arrival_time=0.0))
    h.add(make_request("small", prompt(1, start=50), max_tokens=3, arrival_time=1.0))
    h.run()
    assert h.results["grows"].tokens == expected_tokens("grows", 10, 15)
    assert h.results["grows"].finish_reason == FinishReason.LENGTH
    assert h.results["small"].tokens == expected_tokens("small", 1, 3)
    assert h.scheduler.num_preemptions == 0
    h.assert_drained()
