"""A scripted stand-in for the model runner and a driver for the scheduler tests.

The fake runner behaves like a greedy model: the token it samples at a position depends only
on (request id, position), so a request's output must not change with batching, chunking,
prefix hits or preemption. It also keeps a model of the paged KV cache: every computed slot
records the token prefix it was computed from, and every step checks that the context a
request attends to (positions before `start`) is present in its blocks with exactly that
prefix. A wrong block table, a shared block overwritten or a prefix hit on the wrong block
therefore fails the step that reads it. With a sliding window W it checks only the context
a windowed model reads (positions from start - W + 1 on), and that no step reads or writes
the null block that given-back table entries point at.

The driver runs `check_state()` (the scheduler's `check_invariants()` and a few more checks)
after every add, schedule, update and abort, and checks each batch against the scheduler's
limits.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from engine.core.batch import ScheduledBatch, ScheduledRequest
from engine.config import SchedulerConfig
from engine.kv_cache import KVCacheManager
from engine.core.outputs import ModelRunnerOutput, RequestOutput
from engine.core.request import FinishReason, Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler

EOS = 2
TokenScript = Callable[[str, int], int]


def default_token(request_id: str, position: int) -> int:
    """Never EOS (always >= 100); varies with both the request and the position."""
    return 100 + (sum(request_id.encode()) * 7 + position * 13) % 89


def scripted(overrides: dict[tuple[str, int], int]) -> TokenScript:
    """`default_token`, except at the given (request id, position) pairs."""

    def token(request_id: str, position: int) -> int:
        return overrides.get((request_id, position), default_token(request_id, position))

    return token


def prompt(n: int, start: int = 10) -> list[int]:
    return list(range(start, start + n))


def make_request(
    request_id: str,
    prompt_token_ids: list[int],
    *,
    max_tokens: int,
    eos_token_ids: frozenset[int] = frozenset({EOS}),
    priority: int = 0,
    cache_salt: str = "",
    arrival_time: float | None = None,
    **params: object,
) -> Request:
    return Request(
        request_id,
        prompt_token_ids,
        SamplingParams(temperature=0.0, max_tokens=max_tokens, **params),  # type: ignore[arg-type]
        max_tokens=max_tokens,
        eos_token_ids=eos_token_ids,
        priority=priority,
        cache_salt=cache_salt,
        arrival_time=arrival_time,
    )


def expected_tokens(request_id: str, prompt_len: int, num_tokens: int,
                    script: TokenScript = default_token) -> list[int]:
    """What a greedy model following `script` generates after a prompt of `prompt_len`."""
    return [script(request_id, prompt_len + i) for i in range(num_tokens)]


class FakeRunner:
    def __init__(
        self,
        block_size: int,
        script: TokenScript = default_token,
        *,
        sliding_window: int | None = None,
        null_block_id: int | None = None,
        group_windows: tuple[int | None, ...] | None = None,
    ) -> None:
        self.block_size = block_size
        self.script = script
        # One window per KV cache group (each group reads and writes its own block table).
        self.group_windows = group_windows or (sliding_window,)
        self.null_block_id = null_block_id
        # (block id, offset) -> the group that wrote the slot and the token prefix whose last
        # token's KV it holds (groups share the slots: one group's KV never serves another).
        self.kv: dict[tuple[int, int], tuple[int, tuple[int, ...]]] = {}

    def _slot(self, scheduled: ScheduledRequest, group: int, position: int) -> tuple[int, int]:
        tables = scheduled.block_tables
        table = tables[group] if tables else scheduled.block_ids
        block_id = table[position // self.block_size]
        assert block_id != self.null_block_id, (scheduled.request_id, group, position)
        return block_id, position % self.block_size

    def _first_read(self, start: int, group: int) -> int:
        """The first position the step's first query (at `start`) attends to."""
        window = self.group_windows[group]
        if window is None:
            return 0
        return max(0, start - window + 1)

    def execute(self, batch: ScheduledBatch) -> ModelRunnerOutput:
        # Reads first, then writes: a step attends only to KV computed by earlier steps.
        groups = range(len(self.group_windows))
        for s in batch.requests:
            end = s.start + s.num_tokens
            assert 1 <= s.num_tokens and 0 <= s.start and end <= len(s.token_ids), s
            assert s.sample == (end == len(s.token_ids)), s
            assert len(s.block_ids) * self.block_size >= end, s
            for group in groups:
                for position in range(self._first_read(s.start, group), s.start):
                    slot = self._slot(s, group, position)
                    expected = (group, tuple(s.token_ids[: position + 1]))
                    assert self.kv.get(slot) == expected, (s.request_id, group, position)
        written: set[tuple[int, int]] = set()
        for s in batch.requests:
            for group in groups:
                for position in range(s.start, s.start + s.num_tokens):
                    slot = self._slot(s, group, position)
                    assert slot not in written, f"slot {slot} written twice in one step"
                    written.add(slot)
                    self.kv[slot] = (group, tuple(s.token_ids[: position + 1]))
        sampled = [s for s in batch.requests if s.sample]
        return ModelRunnerOutput(
            request_ids=[s.request_id for s in sampled],
            sampled_token_ids=[self.script(s.request_id, len(s.token_ids)) for s in sampled],
        )


@dataclass
class Result:
    """Everything the scheduler emitted for one request."""

    tokens: list[int] = field(default_factory=list)
    outputs: list[RequestOutput] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None


class Harness:
    def __init__(
        self,
        *,
        num_blocks: int = 1024,
        block_size: int = 4,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        policy: str = "fcfs",
        max_model_len: int = 100_000,
        script: TokenScript = default_token,
        enable_prefix_caching: bool = True,
        sliding_window: int | None = None,
        group_windows: tuple[int | None, ...] | None = None,
    ) -> None:
        self.config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            policy=policy,
        )
        self.kv_cache = KVCacheManager(
            num_blocks, block_size, enable_prefix_caching=enable_prefix_caching,
            sliding_window=sliding_window, group_windows=group_windows,
        )
        self.scheduler = Scheduler(self.config, self.kv_cache, max_model_len)
        self.runner = FakeRunner(
            block_size, script, sliding_window=sliding_window,
            null_block_id=self.kv_cache.null_block_id, group_windows=group_windows,
        )
        self.results: dict[str, Result] = {}
        # Request id -> position in the order of add() calls (FCFS order).
        self._add_order: dict[str, int] = {}
        self._num_added = 0
        self.batches: list[ScheduledBatch] = []
        # Ids in `scheduler.running` just before each schedule() call, in order.
        self.running_before: list[list[str]] = []

    def add(self, *requests: Request) -> None:
        for request in requests:
            self.scheduler.add_request(request)
            self.results[request.request_id] = Result()
            self._add_order[request.request_id] = self._num_added
            self._num_added += 1
            self.check_state()

    def step(self) -> tuple[ScheduledBatch, list[RequestOutput]]:
        self.running_before.append([r.request_id for r in self.scheduler.running])
        batch = self.scheduler.schedule()
        self.check_state()
        self._check_batch(batch)
        self.batches.append(batch)
        outputs = self.scheduler.update_from_output(batch, self.runner.execute(batch))
        self.check_state()
        self.record(outputs)
        return batch, outputs

    def abort(self, request_ids: list[str], reason: FinishReason) -> list[str]:
        aborted = self.scheduler.abort_requests(request_ids, reason)
        self.check_state()
        return aborted

    def run(self, max_steps: int = 2000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished_requests:
                break
            self.step()
        assert not self.scheduler.has_unfinished_requests, "requests never finished"
        self.record(self.scheduler.take_pending_outputs())

    def record(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            result = self.results[out.request_id]
            assert result.finish_reason is None, f"output after finish: {out}"
            result.tokens.extend(out.new_token_ids)
            result.outputs.append(out)
            result.finish_reason, result.stop_token_id = out.finish_reason, out.stop_token_id

    def scheduled(self, batch: ScheduledBatch, request_id: str) -> ScheduledRequest | None:
        return next((s for s in batch.requests if s.request_id == request_id), None)

    def schedule_of(self, request_id: str) -> list[tuple[int, int, bool] | None]:
        """Per step: (start, num_tokens, sample) of the request, or None if not scheduled."""
        rows = [self.scheduled(b, request_id) for b in self.batches]
        return [(s.start, s.num_tokens, s.sample) if s else None for s in rows]

    def check_state(self) -> None:
        """The scheduler's own invariants, plus what follows from the design:

        - a queued request (waiting or preempted) holds no blocks and no progress;
        - a running request always has at least one token left to compute;
        - under FCFS, every running request arrived before every queued one, and both lists
          are in arrival order (preempted requests return to the front of the queue).
        """
        self.scheduler.check_invariants()
        for request in self.scheduler.waiting:
            assert request.block_ids == [] and request.num_computed_tokens == 0, request
        for request in self.scheduler.running:
            assert request.num_computed_tokens < request.num_tokens, request
        if self.config.policy == "fcfs":
            queue = [*self.scheduler.running, *self.scheduler.waiting]
            order = [self._add_order[r.request_id] for r in queue]
            assert order == sorted(order), [r.request_id for r in queue]

    def _check_batch(self, batch: ScheduledBatch) -> None:
        ids = [s.request_id for s in batch.requests]
        assert len(ids) == len(set(ids)), ids
        assert batch.num_scheduled_tokens == sum(s.num_tokens for s in batch.requests)
        assert batch.num_scheduled_tokens <= self.config.max_num_batched_tokens
        assert len(batch.requests) <= self.config.max_num_seqs
        assert self.scheduler.num_running <= self.config.max_num_seqs
        for request_id in ids:
            assert self.scheduler.requests[request_id].status == RequestStatus.RUNNING
        assert not set(ids) & set(batch.preempted_request_ids)

    def assert_drained(self) -> None:
        """No request left and every block back in the free queue."""
        self.scheduler.check_invariants()
        assert self.scheduler.requests == {}
        assert self.scheduler.running == []
        assert len(self.scheduler.waiting) == 0
        assert self.kv_cache.pool.num_free_blocks == self.kv_cache.num_blocks
        assert all(b.ref_cnt == 0 for b in self.kv_cache.pool.blocks)


def run_alone(request: Request, script: TokenScript = default_token) -> Result:
    """The request's result in an otherwise empty engine with a large pool."""
    harness = Harness(num_blocks=4096, script=script)
    harness.add(request)
    harness.run()
    harness.assert_drained()
    return harness.results[request.request_id]
