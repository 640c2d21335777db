"""Scheduler: token-level stop conditions, aborts and queue deadlines, driven by the scripted
runner."""
from __future__ import annotations

import time

import pytest

from engine.core.request import FinishReason, RequestStatus
from scheduler_harness import EOS, Harness, expected_tokens, make_request, prompt, scripted

P = 5  # prompt length: output token i sits at position P + i


# ----- stop conditions -------------------------------------------------------------------


def test_eos_stops_and_is_the_last_token() -> None:
    script = scripted({("r", P + 3): EOS})
    h = Harness(script=script)
    h.add(make_request("r", prompt(P), max_tokens=10))
    h.run()
    result = h.results["r"]
    assert result.tokens == expected_tokens("r", P, 3) + [EOS]
    assert (result.finish_reason, result.stop_token_id) == (FinishReason.STOP, None)
    assert result.outputs[-1].finished and result.outputs[-1].new_token_ids == [EOS]
    h.assert_drained()


def test_eos_before_min_tokens_is_ignored() -> None:
    script = scripted({("r", P): EOS, ("r", P + 1): EOS, ("r", P + 2): EOS})
    h = Harness(script=script)
    h.add(make_request("r", prompt(P), max_tokens=10, min_tokens=2))
    h.run()
    # The first EOS is output token 1 of at least 2: ignored. The second one counts.
    assert h.results["r"].tokens == [EOS, EOS]
    assert h.results["r"].finish_reason == FinishReason.STOP
    h.assert_drained()


def test_eos_token_ids_are_per_request() -> None:
    script = scripted({("r", P + 1): 7})
    h = Harness(script=script)
    h.add(make_request("r", prompt(P), max_tokens=10, eos_token_ids=frozenset({7, 8})))
    h.run()
    assert h.results["r"].tokens == expected_tokens("r", P, 1) + [7]
    assert h.results["r"].finish_reason == FinishReason.STOP
    h.assert_drained()


def test_ignore_eos_runs_to_max_tokens() -> None:
    script = scripted({("r", P + 1): EOS, ("r", P + 3): EOS})
    h = Harness(script=script)
    h.add(make_request("r", prompt(P), max_tokens=5, ignore_eos=True))
    h.run()
    assert h.results["r"].tokens == expected_tokens("r", P, 5, script)
    assert h.results["r"].tokens.count(EOS) == 2
    assert h.results["r"].finish_reason == FinishReason.LENGTH
    h.assert_drained()


def test_stop_token_id_is_reported() -> None:
    script = scripted({("r", P + 2): 150})
    h = Harness(script=script)
    h.add(make_request("r", prompt(P), max_tokens=10, stop_token_ids=(149, 150)))
    h.run()
    result = h.results["r"]
    assert result.tokens == expected_tokens("r", P, 2) + [150]
    assert (result.finish_reason, result.stop_token_id) == (FinishReason.STOP, 150)
    h.assert_drained()


def test_stop_token_ids_apply_even_with_ignore_eos_but_not_before_min_tokens() -> None:
    script = scripted({("r", P): 150, ("r", P + 1): EOS, ("r", P + 2): 150})
    h = Harness(script=script)
    h.add(
        make_request(
            "r", prompt(P), max_tokens=10, stop_token_ids=(150,), min_tokens=2, ignore_eos=True
        )
    )
    h.run()
    assert h.results["r"].tokens == [150, EOS, 150]
    assert (h.results["r"].finish_reason, h.results["r"].stop_token_id) == (FinishReason.STOP, 150)
    h.assert_drained()


def test_max_tokens_finishes_with_length() -> None:
    h = Harness()
    h.add(make_request("r", prompt(P), max_tokens=4))
    h.run()
    assert h.results["r"].tokens == expected_tokens("r", P, 4)
    assert h.results["r"].finish_reason == FinishReason.LENGTH
    assert h.results["r"].stop_token_id is None
    # One output per generated token; only the last one carries the finish reason.
    assert [o.finished for o in h.results["r"].outputs] == [False, False, False, True]
    assert all(o.num_prompt_tokens == P for o in h.results["r"].outputs)
    h.assert_drained()


def test_eos_on_the_last_allowed_token_is_a_stop() -> None:
    h = Harness(script=scripted({("r", P + 3): EOS}))
    h.add(make_request("r", prompt(P), max_tokens=4))
    h.run()
    assert h.results["r"].finish_reason == FinishReason.STOP
    h.assert_drained()


def test_max_model_len_finishes_with_length() -> None:
    h = Harness(max_model_len=P + 3)
    h.add(make_request("r", prompt(P), max_tokens=100))
    h.run()
    # The sequence may grow to max_model_len tokens in all: 3 generated.
    assert h.results["r"].tokens == expected_tokens("r", P, 3)
    assert h.results["r"].finish_reason == FinishReason.LENGTH
    h.assert_drained()


def test_finished_ids_are_reported_in_the_next_batch() -> None:
    h = Harness()
    h.add(make_request("short", prompt(P), max_tokens=1))
    h.add(make_request("long", prompt(P, start=40), max_tokens=3))
    first, outputs = h.step()
    assert first.finished_request_ids == []
    assert {o.request_id for o in outputs if o.finished} == {"short"}
    second, _ = h.step()
    assert second.finished_request_ids == ["short"]
    assert [s.request_id for s in second.requests] == ["long"]
    h.run()
    h.assert_drained()


# ----- aborts ----------------------------------------------------------------------------


def test_abort_waiting_request() -> None:
    h = Harness(max_num_seqs=1)
    h.add(make_request("a", prompt(P), max_tokens=4))
    h.add(make_request("b", prompt(P, start=40), max_tokens=4))
    h.step()
    assert h.scheduler.requests["b"].status == RequestStatus.WAITING
    assert h.abort(["b"], FinishReason.CANCELLED) == ["b"]
    assert "b" not in h.scheduler.requests and h.scheduler.num_waiting == 0
    batch, outputs = h.step()
    assert batch.finished_request_ids == ["b"]
    assert [s.request_id for s in batch.requests] == ["a"]
    b_out = [o for o in outputs if o.request_id == "b"]
    assert len(b_out) == 1
    assert (b_out[0].finish_reason, b_out[0].new_token_ids) == (FinishReason.CANCELLED, [])
    h.run()
    assert h.results["a"].tokens == expected_tokens("a", P, 4)
    assert h.results["b"].tokens == []
    h.assert_drained()


def test_abort_running_request_frees_its_blocks_at_once() -> None:
    h = Harness(num_blocks=16)
    h.add(make_request("a", prompt(9), max_tokens=10))
    h.step()
    h.step()
    assert h.kv_cache.pool.num_free_blocks < 16
    assert h.abort(["a"], FinishReason.ABORT) == ["a"]
    assert h.kv_cache.pool.num_free_blocks == 16
    assert not h.scheduler.has_unfinished_requests
    pending = h.scheduler.take_pending_outputs()
    assert [(o.request_id, o.finish_reason, o.new_token_ids) for o in pending] == [
        ("a", FinishReason.ABORT, [])
    ]
    h.record(pending)
    assert h.scheduler.take_pending_outputs() == []
    batch, outputs = h.step()
    assert batch.is_empty and batch.finished_request_ids == ["a"]
    assert outputs == []
    assert h.results["a"].tokens == expected_tokens("a", 9, 2)
    h.assert_drained()


def test_abort_while_the_batch_is_in_flight() -> None:
    h = Harness()
    h.add(make_request("a", prompt(P), max_tokens=5))
    h.add(make_request("b", prompt(P, start=40), max_tokens=5))
    h.step()
    batch = h.scheduler.schedule()
    output = h.runner.execute(batch)
    h.abort(["a"], FinishReason.CANCELLED)
    outputs = h.scheduler.update_from_output(batch, output)
    h.scheduler.check_invariants()
    # The token the runner sampled for a is dropped; only the abort output remains.
    a_out = [o for o in outputs if o.request_id == "a"]
    assert [(o.finish_reason, o.new_token_ids) for o in a_out] == [(FinishReason.CANCELLED, [])]
    h.record(outputs)
    h.run()
    assert h.results["a"].tokens == expected_tokens("a", P, 1)
    assert h.results["b"].tokens == expected_tokens("b", P, 5)
    h.assert_drained()


def test_abort_keeps_blocks_shared_with_another_request() -> None:
    h = Harness(num_blocks=16)
    h.add(make_request("a", prompt(9), max_tokens=6))
    h.step()
    h.add(make_request("b", prompt(9), max_tokens=6))
    h.step()
    shared = h.scheduler.requests["b"].block_ids[:2]
    assert shared == h.scheduler.requests["a"].block_ids[:2]
    h.abort(["a"], FinishReason.ABORT)
    assert [h.kv_cache.pool.blocks[i].ref_cnt for i in shared] == [1, 1]
    h.run()  # the runner checks b still reads a's prefix blocks intact
    assert h.results["b"].tokens == expected_tokens("b", 9, 6)
    h.assert_drained()


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_abort_preempted_request(policy: str) -> None:
    h = Harness(num_blocks=4, block_size=4, policy=policy)
    h.add(make_request("old", prompt(4), max_tokens=10, arrival_time=0.0))
    h.step()
    h.add(make_request("new", prompt(4, start=50), max_tokens=10, arrival_time=1.0))
    while not h.step()[0].preempted_request_ids:
        pass
    (victim,) = h.batches[-1].preempted_request_ids
    assert h.scheduler.requests[victim].status == RequestStatus.PREEMPTED
    assert h.abort([victim], FinishReason.ABORT) == [victim]
    h.run()
    assert h.results[victim].finish_reason == FinishReason.ABORT
    h.assert_drained()


def test_abort_unknown_or_finished_id_is_a_no_op() -> None:
    h = Harness()
    h.add(make_request("a", prompt(P), max_tokens=1))
    h.run()
    assert h.step()[0].finished_request_ids == ["a"]  # a's normal finish, reported once
    assert h.abort(["nope", "a"], FinishReason.ABORT) == []
    assert h.scheduler.take_pending_outputs() == []
    batch, _ = h.step()
    assert batch.finished_request_ids == []
    h.assert_drained()


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_request_id_can_be_reused_after_abort(policy: str) -> None:
    h = Harness(max_num_seqs=1, policy=policy)
    h.add(make_request("busy", prompt(P), max_tokens=3, arrival_time=0.0))
    h.add(make_request("x", prompt(P, start=40), max_tokens=3, arrival_time=1.0))
    h.step()
    h.abort(["x"], FinishReason.CANCELLED)  # still waiting
    h.record(h.scheduler.take_pending_outputs())
    h.results.pop("x")
    # A client retries with the same id and a different prompt.
    h.add(make_request("x", prompt(7, start=70), max_tokens=2, arrival_time=2.0))
    h.run()
    assert h.results["x"].tokens == expected_tokens("x", 7, 2)
    assert h.results["x"].finish_reason == FinishReason.LENGTH
    h.assert_drained()


# ----- deadlines -------------------------------------------------------------------------


def test_expired_deadline_evicts_from_the_queue_instead_of_admitting() -> None:
    """A request whose deadline passed while it waited is finished (DEADLINE) when it would be
    admitted: never scheduled, no blocks, no tokens; the one behind it is admitted instead."""
    h = Harness(max_num_seqs=1)
    h.add(make_request("busy", prompt(P), max_tokens=2))
    late = make_request("late", prompt(P, start=40), max_tokens=3)
    late.deadline = time.monotonic() - 1.0  # already past
    h.add(late, make_request("next", prompt(P, start=70), max_tokens=2))
    h.run()
    assert h.results["late"].finish_reason == FinishReason.DEADLINE
    assert h.results["late"].tokens == []
    assert all(h.scheduled(b, "late") is None for b in h.batches)
    assert late.first_scheduled_time is None and late.block_ids == []
    assert h.results["next"].tokens == expected_tokens("next", P, 2)
    h.assert_drained()


def test_deadline_in_the_future_is_admitted_and_records_first_scheduling() -> None:
    h = Harness()
    request = make_request("r", prompt(P), max_tokens=3)
    request.deadline = time.monotonic() + 3600.0
    h.add(request)
    h.step()
    first = request.first_scheduled_time
    assert first is not None
    h.run()
    assert request.first_scheduled_time == first  # the first admission, kept
    assert h.results["r"].finish_reason == FinishReason.LENGTH
    h.assert_drained()
