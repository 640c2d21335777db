"""Scheduler batching: token budget, sequence limit, chunked prefill, decode-first ordering,
and the FCFS / priority admission order. Driven by the scripted runner in scheduler_harness;
invariants are checked after every schedule and update."""
from __future__ import annotations

import pytest

from engine.core.request import FinishReason
from scheduler_harness import Harness, expected_tokens, make_request, prompt


def test_budget_and_max_num_seqs_hold_and_outputs_are_unchanged() -> None:
    h = Harness(max_num_seqs=3, max_num_batched_tokens=16)
    specs = [(f"r{i}", 1 + (i * 7) % 30, 1 + (i * 5) % 9) for i in range(12)]
    for request_id, prompt_len, max_tokens in specs:
        h.add(make_request(request_id, prompt(prompt_len), max_tokens=max_tokens))
    h.run()
    for request_id, prompt_len, max_tokens in specs:
        result = h.results[request_id]
        assert result.tokens == expected_tokens(request_id, prompt_len, max_tokens)
        assert result.finish_reason == FinishReason.LENGTH
    # Both limits were actually binding at some point (the harness checks they never break).
    assert max(len(b.requests) for b in h.batches) == 3
    assert max(b.num_scheduled_tokens for b in h.batches) == 16
    h.assert_drained()


def test_budget_exactly_filled_by_decodes() -> None:
    h = Harness(max_num_batched_tokens=3)
    for i in range(3):
        h.add(make_request(f"r{i}", prompt(1, start=20 + i), max_tokens=6))
    h.run()
    for i in range(3):
        assert h.schedule_of(f"r{i}") == [(p, 1, True) for p in range(6)]
    assert [b.num_scheduled_tokens for b in h.batches] == [3] * 6
    h.assert_drained()


def test_long_prompt_is_split_into_budget_sized_chunks() -> None:
    h = Harness(max_num_batched_tokens=8)
    h.add(make_request("long", prompt(30), max_tokens=3))
    h.run()
    assert h.schedule_of("long") == [
        (0, 8, False),
        (8, 8, False),
        (16, 8, False),
        (24, 6, True),  # the final chunk reaches the newest token and samples
        (30, 1, True),
        (31, 1, True),
    ]
    assert h.results["long"].tokens == expected_tokens("long", 30, 3)
    # Chunks sample nothing, so the first output arrives with the final chunk.
    assert [len(o.new_token_ids) for o in h.results["long"].outputs] == [1, 1, 1]
    h.assert_drained()


def test_prompt_of_exactly_the_budget_is_one_chunk() -> None:
    h = Harness(max_num_batched_tokens=8)
    h.add(make_request("r", prompt(8), max_tokens=2))
    h.run()
    assert h.schedule_of("r") == [(0, 8, True), (8, 1, True)]
    h.assert_drained()


def test_running_decodes_go_before_a_new_prompts_chunks() -> None:
    h = Harness(max_num_batched_tokens=8)
    h.add(make_request("dec", prompt(3), max_tokens=20))
    h.step()  # dec prefilled; it decodes from now on
    h.add(make_request("long1", prompt(30, start=40), max_tokens=2))
    h.add(make_request("long2", prompt(12, start=80), max_tokens=2))
    h.run()
    dec_steps = h.schedule_of("dec")
    # dec decodes in every step until it finishes: the long prompts never stall it.
    assert dec_steps[0] == (0, 3, True)
    assert dec_steps[1:20] == [(3 + i, 1, True) for i in range(19)]
    assert all(s is None for s in dec_steps[20:])
    for batch in h.batches[1:20]:
        assert batch.requests[0].request_id == "dec"
        # Budget left after the decode goes to one prompt chunk at a time (7 tokens).
        chunks = [s for s in batch.requests[1:] if not s.is_decode]
        assert sum(s.num_tokens for s in chunks) <= 7
    # long1 is chunked by the budget left after the decode: 7 + 7 + 7 + 7 + 2.
    long1 = [s for s in h.schedule_of("long1") if s is not None]
    assert long1[:5] == [
        (0, 7, False), (7, 7, False), (14, 7, False), (21, 7, False), (28, 2, True)
    ]
    for request_id, prompt_len in (("dec", 3), ("long1", 30), ("long2", 12)):
        max_tokens = 20 if request_id == "dec" else 2
        assert h.results[request_id].tokens == expected_tokens(request_id, prompt_len, max_tokens)
    h.assert_drained()


def test_several_decodes_keep_running_while_a_prompt_is_chunked() -> None:
    h = Harness(max_num_batched_tokens=6)
    for i in range(3):
        h.add(make_request(f"d{i}", prompt(2, start=20 + i), max_tokens=12))
    h.step()  # all three prefilled together (6 tokens)
    h.add(make_request("long", prompt(20), max_tokens=1))
    for _ in range(6):
        batch, _ = h.step()
        assert [s.request_id for s in batch.requests[:3]] == ["d0", "d1", "d2"]
        assert all(s.num_tokens == 1 for s in batch.requests[:3])
        assert [(s.request_id, s.num_tokens) for s in batch.requests[3:]] == [("long", 3)]
    h.run()
    for i in range(3):
        assert h.results[f"d{i}"].tokens == expected_tokens(f"d{i}", 2, 12)
    assert h.results["long"].tokens == expected_tokens("long", 20, 1)
    h.assert_drained()


def _first_steps(h: Harness, request_ids: list[str]) -> dict[str, int]:
    return {
        rid: next(i for i, s in enumerate(h.schedule_of(rid)) if s is not None)
        for rid in request_ids
    }


def test_fcfs_admits_in_arrival_order() -> None:
    h = Harness(max_num_seqs=1)
    priorities = {"a": 3, "b": 1, "c": 2, "d": 1}
    for i, (rid, priority) in enumerate(priorities.items()):
        h.add(make_request(rid, prompt(3), max_tokens=2, priority=priority, arrival_time=float(i)))
    h.run()
    first = _first_steps(h, list(priorities))
    assert sorted(priorities, key=first.__getitem__) == ["a", "b", "c", "d"]
    h.assert_drained()


def test_priority_policy_admits_lower_priority_value_first() -> None:
    h = Harness(max_num_seqs=1, policy="priority")
    priorities = {"a": 3, "b": 1, "c": 2, "d": 1, "e": -1}
    for i, (rid, priority) in enumerate(priorities.items()):
        h.add(make_request(rid, prompt(3), max_tokens=2, priority=priority, arrival_time=float(i)))
    h.run()
    first = _first_steps(h, list(priorities))
    # Equal priorities keep arrival order (b before d).
    assert sorted(priorities, key=first.__getitem__) == ["e", "b", "d", "c", "a"]
    for rid in priorities:
        assert h.results[rid].tokens == expected_tokens(rid, 3, 2)
    h.assert_drained()


def test_priority_request_arriving_later_overtakes_the_queue() -> None:
    h = Harness(max_num_seqs=1, policy="priority")
    h.add(make_request("first", prompt(3), max_tokens=3, priority=5, arrival_time=0.0))
    h.add(make_request("low", prompt(3), max_tokens=3, priority=5, arrival_time=1.0))
    h.step()  # "first" runs; it is not interrupted by what arrives next
    h.add(make_request("urgent", prompt(3), max_tokens=3, priority=0, arrival_time=2.0))
    h.run()
    first = _first_steps(h, ["first", "low", "urgent"])
    assert first["first"] < first["urgent"] < first["low"]
    h.assert_drained()


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_max_num_seqs_counts_running_requests_not_batch_rows(policy: str) -> None:
    h = Harness(max_num_seqs=2, max_num_batched_tokens=4, policy=policy)
    h.add(make_request("a", prompt(8), max_tokens=4))
    h.add(make_request("b", prompt(2, start=50), max_tokens=4))
    h.add(make_request("c", prompt(2, start=60), max_tokens=4))
    h.run()
    for batch_before in h.running_before:
        assert len(batch_before) <= 2
    # c waits for a slot: it starts only after a or b finished.
    first_c = _first_steps(h, ["c"])["c"]
    done_before_c = [
        rid for rid in ("a", "b")
        if all(s is None for s in h.schedule_of(rid)[first_c:])
    ]
    assert done_before_c
    h.assert_drained()


def test_duplicate_request_id_is_rejected() -> None:
    h = Harness()
    h.add(make_request("a", prompt(3), max_tokens=1))
    with pytest.raises(ValueError):
        h.scheduler.add_request(make_request("a", prompt(3), max_tokens=1))
    h.run()
    h.assert_drained()


def test_empty_scheduler_produces_empty_batches() -> None:
    h = Harness()
    batch, outputs = h.step()
    assert batch.is_empty and batch.num_scheduled_tokens == 0
    assert outputs == []
    h.assert_drained()
