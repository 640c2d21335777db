"""Embedding (pooling) requests in the scheduler: whole prompts batched under the token budget,
no KV blocks, finished after one step with their vector, and queued in the same policy order
as generation requests."""
from __future__ import annotations

from engine.core.batch import ScheduledBatch
from engine.core.outputs import ModelRunnerOutput, RequestOutput
from engine.pooling_params import PoolingParams
from engine.core.request import FinishReason, Request
from engine.sampling_params import SamplingParams
from scheduler_harness import FakeRunner, Harness, make_request, prompt


def pooling_request(request_id: str, num_tokens: int, priority: int = 0) -> Request:
    return Request(
        request_id, prompt(num_tokens), SamplingParams(), max_tokens=0, priority=priority,
        pooling_params=PoolingParams(),
    )


class PoolingFakeRunner(FakeRunner):
    """Generation as the harness scripts it; each pooled vector is [len(tokens), first token]."""

    def execute(self, batch: ScheduledBatch) -> ModelRunnerOutput:
        output = super().execute(batch)
        output.embeddings = {
            job.request_id: [float(len(job.token_ids)), float(job.token_ids[0])]
            for job in batch.pooling
        }
        return output


def drive(
    h: Harness, max_steps: int = 200
) -> tuple[list[ScheduledBatch], dict[str, RequestOutput]]:
    batches: list[ScheduledBatch] = []
    finished: dict[str, RequestOutput] = {}
    for _ in range(max_steps):
        if not h.scheduler.has_unfinished_requests:
            break
        batch = h.scheduler.schedule()
        h.scheduler.check_invariants()
        assert batch.num_scheduled_tokens == sum(s.num_tokens for s in batch.requests) + sum(
            len(job.token_ids) for job in batch.pooling
        )
        batches.append(batch)
        for out in h.scheduler.update_from_output(batch, h.runner.execute(batch)):
            if out.finished:
                finished[out.request_id] = out
        h.scheduler.check_invariants()
    assert not h.scheduler.has_unfinished_requests
    return batches, finished


def test_pooling_requests_batch_up_to_the_budget_without_kv_blocks() -> None:
    h = Harness(num_blocks=8, block_size=4, max_num_batched_tokens=20)
    h.runner = PoolingFakeRunner(4)
    for i, n in enumerate([8, 8, 8, 3]):
        h.scheduler.add_request(pooling_request(f"e{i}", n))
    batches, finished = drive(h)
    # 8 + 8 fit the budget of 20; the third waits (head of line), then 8 + 3 run together.
    assert [[job.request_id for job in b.pooling] for b in batches] == [["e0", "e1"], ["e2", "e3"]]
    assert all(not b.requests for b in batches)
    for i, n in enumerate([8, 8, 8, 3]):
        out = finished[f"e{i}"]
        assert out.finish_reason == FinishReason.STOP
        assert out.embedding == [float(n), 10.0]
        assert out.new_token_ids == [] and out.num_prompt_tokens == n
    h.assert_drained()


def test_a_prompt_longer_than_the_budget_runs_alone_rather_than_never() -> None:
    h = Harness(max_num_batched_tokens=8)
    h.runner = PoolingFakeRunner(4)
    h.scheduler.add_request(pooling_request("big", 30))
    h.scheduler.add_request(pooling_request("small", 2))
    batches, finished = drive(h)
    assert [[job.request_id for job in b.pooling] for b in batches] == [["big"], ["small"]]
    assert set(finished) == {"big", "small"}
    h.assert_drained()


def test_pooling_and_generation_share_one_queue_in_arrival_order() -> None:
    h = Harness(max_num_batched_tokens=10, block_size=4)
    h.runner = PoolingFakeRunner(4)
    h.scheduler.add_request(make_request("g0", prompt(6), max_tokens=3))
    h.scheduler.add_request(pooling_request("e0", 6))
    h.scheduler.add_request(make_request("g1", prompt(2, start=40), max_tokens=2))
    batches, finished = drive(h)
    first = batches[0]
    # g0 takes 6 of 10 tokens; e0 (6) does not fit and, being next in line, holds g1 back.
    assert [s.request_id for s in first.requests] == ["g0"] and first.pooling == []
    second = batches[1]
    assert [job.request_id for job in second.pooling] == ["e0"]
    assert [s.request_id for s in second.requests] == ["g0", "g1"]
    assert finished["e0"].embedding == [6.0, 10.0]
    assert finished["g0"].finish_reason == FinishReason.LENGTH
    h.assert_drained()


def test_priority_policy_orders_embeddings_like_generation() -> None:
    h = Harness(max_num_batched_tokens=4, policy="priority")
    h.runner = PoolingFakeRunner(4)
    h.scheduler.add_request(pooling_request("late", 4, priority=5))
    h.scheduler.add_request(pooling_request("urgent", 4, priority=-1))
    batches, _ = drive(h)
    assert [[job.request_id for job in b.pooling] for b in batches] == [["urgent"], ["late"]]


def test_aborting_a_queued_embedding_request_frees_it() -> None:
    h = Harness(max_num_batched_tokens=4)
    h.runner = PoolingFakeRunner(4)
    h.scheduler.add_request(pooling_request("a", 4))
    h.scheduler.add_request(pooling_request("b", 4))
    assert h.scheduler.abort_requests(["b"], FinishReason.CANCELLED) == ["b"]
    batches, finished = drive(h)
    assert [[job.request_id for job in b.pooling] for b in batches] == [["a"]]
    assert finished["b"].finish_reason == FinishReason.CANCELLED
    assert finished["b"].embedding is None
    assert finished["a"].embedding == [4.0, 10.0]
    h.assert_drained()
