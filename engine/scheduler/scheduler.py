"""Continuous batching: every step, decide which requests compute how many tokens.

There are no prefill/decode phases. Each request wants `num_tokens - num_computed_tokens`
tokens; the step's token budget (`max_num_batched_tokens`) is handed out

  1. to RUNNING requests first, in order (decodes and unfinished prompt chunks), so a long
     prompt never stalls the decoding of others by more than one chunk;
  2. then to WAITING requests in policy order (FCFS or priority), starting each one past its
     prefix-cache hit, while there is budget, a free sequence slot and KV room. A request
     whose deadline has passed is finished (DEADLINE) instead of admitted.

When the KV pool runs dry for a running request, the least important request not yet scheduled
this step is preempted (by recompute: its blocks are freed, its progress reset, and it goes
back to the waiting queue with its generated tokens kept, so greedy output is unchanged).

KV room is counted in blocks a request really holds: with a sliding window on every layer
the KV cache manager gives back blocks that fell behind the window, so a long request needs
only its window's blocks, and a chunk that would need more than the whole cache is shortened
(`KVCacheManager.fit_new_tokens`) instead of ending the request.

Speculative decoding (`spec`): a running request at its decode point may also compute draft
tokens; they become its tokens only as far as the runner accepted them (`_append_tokens`),
and the blocks only rejected drafts reached are given back.
"""
from __future__ import annotations

import logging
import time

from engine.core.batch import ScheduledBatch, ScheduledPooling, ScheduledRequest
from engine.config import SchedulerConfig
from engine.kv_cache import KVCacheManager
from engine.kv_cache.kv_cache_manager import NO_HIT
from engine.core.outputs import ModelRunnerOutput, RequestOutput
from engine.core.request import FinishReason, Request, RequestStatus
from engine.scheduler.admission import adapter_fits, output_of, pick_victim
from engine.scheduler.invariants import check_scheduler_invariants
from engine.scheduler.logprob_outputs import attach_logprobs, record_prompt_logprobs
from engine.scheduler.stop_conditions import check_stop
from engine.scheduler.waiting_queue import make_waiting_queue
from engine.spec_decode.proposals import SpecDecoder

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager, max_model_len: int,
                 spec: SpecDecoder | None = None,
                 max_loras: int | None = None):
        self.config = config
        # Distinct LoRA adapters the runner can apply in one step (None: LoRA off).
        self.max_loras = max_loras
        self.kv_cache = kv_cache
        self.max_model_len = max_model_len
        self.waiting = make_waiting_queue(config.policy)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        # Reported to the runner with the next batch, then cleared.
        self._finished_ids: list[str] = []
        self._preempted_ids: list[str] = []
        # Outputs of requests finished outside update_from_output (aborts, capacity).
        self._pending_outputs: list[RequestOutput] = []
        self.num_preemptions = 0
        # Speculative decoding (None: off), and the drafts of this step's requests.
        self.spec = spec
        self._drafts: dict[str, list[int]] = {}

    # ----- requests in and out -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def abort_requests(self, request_ids: list[str], reason: FinishReason) -> list[str]:
        """Finish the given requests (queued or running) now; unknown ids are ignored.
        Returns the ids that were actually aborted."""
        aborted = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is not None:
                self._finish(request, reason)
                aborted.append(request_id)
        if aborted:
            self.running = [r for r in self.running if not r.status.is_finished]
        return aborted

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ----- one step -----------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        self._drafts = {}
        budget, preempted = self._schedule_running(budget, scheduled)
        if not preempted:
            self._schedule_waiting(budget, scheduled)
        batch = ScheduledBatch(
            requests=[self._to_scheduled(r, n) for r, n in scheduled if not r.is_pooling],
            num_scheduled_tokens=sum(n for _, n in scheduled),
            pooling=[
                ScheduledPooling(r.request_id, r.all_token_ids, r.pooling_params)
                for r, _ in scheduled
                if r.pooling_params is not None
            ],
            finished_request_ids=self._finished_ids,
            preempted_request_ids=self._preempted_ids,
        )
        self._finished_ids, self._preempted_ids = [], []
        return batch

    def _schedule_running(
        self, budget: int, scheduled: list[tuple[Request, int]]
    ) -> tuple[int, bool]:
        preempted = False
        idx = 0
        if self.spec is not None:  # batched proposals for the requests below
            self.spec.prefetch(self.running, len(self.running))
        while idx < len(self.running) and budget > 0:
            request = self.running[idx]
            num_wanted = request.num_tokens - request.num_computed_tokens
            drafts = []
            if self.spec is not None and num_wanted == 1:
                drafts = self.spec.propose(request, budget, len(self.running))
            num_new = self.kv_cache.fit_new_tokens(
                request.num_computed_tokens, min(num_wanted + len(drafts), budget)
            )
            if num_new == 0:
                # Even an empty cache cannot hold it: end it rather than preempt forever.
                self._finish_for_capacity(request)
                continue
            if drafts and (
                num_new <= num_wanted or not self.kv_cache.allocate_slots(request, num_new)
            ):
                # No room for drafts (a window-shortened step, or a dry pool): drafts are
                # never worth a preemption.
                drafts, num_new = [], min(num_new, num_wanted)
            if drafts:
                self._drafts[request.request_id] = drafts[: num_new - num_wanted]
            while not self.kv_cache.allocate_slots(request, num_new):
                # Only requests not yet scheduled this step are candidates: their blocks are
                # not referenced by the batch being built.
                victim = pick_victim(self.config.policy, self.running[idx:])
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            else:
                scheduled.append((request, num_new))
                budget -= num_new
                idx += 1
        return budget, preempted

    def _schedule_waiting(self, budget: int, scheduled: list[tuple[Request, int]]) -> None:
        while len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.peek()
            if request.deadline is not None and time.monotonic() >= request.deadline:
                # Expired while queued: it must never run. The asyncio side aborts it too when
                # its timer fires, but that abort may arrive after this step admits it.
                self._finish(request, FinishReason.DEADLINE)  # removes it from the queue
                continue
            if request.is_pooling:
                if not self._admit_pooling(request, budget, scheduled):
                    break  # head of line waits for the next step's budget
                budget -= request.num_tokens
                continue
            if self.kv_cache.fit_new_tokens(0, request.num_tokens) == 0:
                self._finish_for_capacity(request)  # removes it from the waiting queue
                continue
            if not adapter_fits(request, self.running, self.max_loras):
                break  # waits until a running request of another adapter finishes
            # prompt_logprobs needs every prompt position computed, so no cached prefix.
            scores_prompt = (
                request.sampling_params.prompt_logprobs is not None
                and request.num_output_tokens == 0
            )
            hit = NO_HIT if scores_prompt else self.kv_cache.find_prefix_hit(request)
            num_computed = hit.num_blocks * self.kv_cache.block_size
            num_new = self.kv_cache.fit_new_tokens(
                num_computed, min(request.num_tokens - num_computed, budget)
            )
            if num_new == 0:
                self._finish_for_capacity(request)  # a window wider than the whole cache
                continue
            if not self.kv_cache.allocate_slots(request, num_new, hit):
                break  # head of line waits for blocks; later requests do not overtake it
            self.waiting.pop()
            self.kv_cache.record_lookup(request, hit)
            request.num_computed_tokens = num_computed
            if request.status == RequestStatus.WAITING:
                request.num_cached_tokens = num_computed
            request.status = RequestStatus.RUNNING
            self._mark_scheduled(request)
            self.running.append(request)
            scheduled.append((request, num_new))
            budget -= num_new

    def _admit_pooling(
        self, request: Request, budget: int, scheduled: list[tuple[Request, int]]
    ) -> bool:
        """Embedding requests run whole in one step and hold no KV blocks (encoders have no
        cache; a decoder's pooling forward uses scratch memory). One that fits the remaining
        budget runs now; one longer than the whole budget could never fit, so it runs
        anyway (overshooting once) rather than wait forever behind steady decode traffic."""
        if request.num_tokens > budget and request.num_tokens <= self.config.max_num_batched_tokens:
            return False
        self.waiting.pop()
        request.status = RequestStatus.RUNNING
        self._mark_scheduled(request)
        self.running.append(request)
        scheduled.append((request, request.num_tokens))
        return True

    @staticmethod
    def _mark_scheduled(request: Request) -> None:
        """The end of its queue wait (metrics); a resumption after preemption keeps the first."""
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()

    def _finish_pooling(self, batch: ScheduledBatch, output: ModelRunnerOutput) -> None:
        """Every embedding request of the batch is done after its one forward."""
        for scheduled in batch.pooling:
            request = self.requests.get(scheduled.request_id)
            if request is None:
                continue  # aborted meanwhile
            request.num_computed_tokens = request.num_tokens
            self._finish(request, FinishReason.STOP)
            self._pending_outputs[-1].embedding = output.embeddings.get(request.request_id)
        self.running = [r for r in self.running if not r.status.is_finished]

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._preempted_ids.append(request.request_id)
        self.waiting.add_preempted(request)

    def _to_scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        drafts = self._drafts.get(request.request_id, ())
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.all_token_ids,
            start=start,
            num_tokens=num_new,
            block_ids=request.block_ids,
            sample=start + num_new - len(drafts) == request.num_tokens,
            sampling_params=request.sampling_params,
            num_prompt_tokens=request.num_prompt_tokens,
            eos_token_ids=request.eos_token_ids,
            grammar=request.grammar,
            lora=request.lora,
            draft_token_ids=drafts,
            block_tables=request.block_tables,
        )

    def update_from_output(
        self, batch: ScheduledBatch, output: ModelRunnerOutput
    ) -> list[RequestOutput]:
        """Advance progress counters, append sampled tokens, apply stop checks."""
        for scheduled in batch.requests:
            request = self.requests.get(scheduled.request_id)
            if request is None:
                continue
            # Drafts count as computed only once accepted (below, with their tokens).
            request.num_computed_tokens += scheduled.num_tokens - len(scheduled.draft_token_ids)
            self.kv_cache.cache_computed_blocks(request)
        record_prompt_logprobs(self.requests, output)
        if batch.pooling:
            self._finish_pooling(batch, output)
        outputs = self.take_pending_outputs()
        drafts = {s.request_id: s.draft_token_ids for s in batch.requests if s.draft_token_ids}
        any_finished = False
        for row, (request_id, token_id) in enumerate(
            zip(output.request_ids, output.sampled_token_ids)
        ):
            request = self.requests.get(request_id)
            if request is None:
                continue
            new_token_ids = [token_id]
            if request_id in drafts:
                num_accepted = output.num_accepted_drafts[request_id]
                new_token_ids = [*drafts[request_id][:num_accepted], token_id]
                if self.spec is not None:
                    self.spec.record(request_id, len(drafts[request_id]), num_accepted)
            out = self._append_tokens(request, new_token_ids)
            if out.finish_reason is not FinishReason.CONSTRAINT:
                attach_logprobs(out, request, output, row)
            if request.status.is_finished:
                any_finished = True
            elif request_id in drafts:
                # The accepted drafts' KV is now valid context: publish its full blocks and
                # give back the blocks only rejected drafts reached.
                self.kv_cache.cache_computed_blocks(request)
                self.kv_cache.free_blocks_beyond(request, request.num_tokens)
            outputs.append(out)
        if any_finished:
            self.running = [r for r in self.running if not r.status.is_finished]
        return outputs

    def _append_tokens(self, request: Request, token_ids: list[int]) -> RequestOutput:
        """Append the step's tokens (one, or accepted drafts then the target's token) one by
        one through the grammar and the stop checks; a stop drops the tokens after it. Every
        token but the last was computed this step (an accepted draft), so it counts as such."""
        emitted: list[int] = []
        stop = None
        for i, token_id in enumerate(token_ids):
            if request.grammar is not None and not request.grammar.accept_token(token_id):
                return self._finish_for_constraint(request, emitted)
            request.append_output_token(token_id)
            emitted.append(token_id)
            if i < len(token_ids) - 1:
                request.num_computed_tokens += 1
            stop = check_stop(request, self.max_model_len)
            if request.grammar is not None and request.grammar.is_terminated:
                # A complete output is a STOP even when it also used the last allowed token.
                if stop is None or stop[0] is FinishReason.LENGTH:
                    stop = (FinishReason.STOP, None)
            if stop is not None:
                break
        out = output_of(request, emitted)
        if stop is not None:
            self._finish(request, stop[0], stop[1], emit=False)
            out.finish_reason, out.stop_token_id = stop
        return out

    def _finish_for_constraint(self, request: Request, emitted: list[int]) -> RequestOutput:
        """The grammar rejected a sampled token: it admitted no token at all there (a dead end,
        left unmasked). That token is dropped: the output stays a valid constrained prefix."""
        assert request.grammar is not None
        self._finish(request, FinishReason.CONSTRAINT, emit=False)
        out = output_of(request, emitted)
        out.finish_reason = FinishReason.CONSTRAINT
        out.finish_message = (
            f"the output constraint admits no further token: {request.grammar.error}"
        )
        return out

    def refuse(self, output: RequestOutput) -> None:
        """The one output of a request the core turned away before queueing it."""
        self._pending_outputs.append(output)

    def take_pending_outputs(self) -> list[RequestOutput]:
        outputs, self._pending_outputs = self._pending_outputs, []
        return outputs

    # ----- finishing ----------------------------------------------------------------------

    def _finish_for_capacity(self, request: Request) -> None:
        logger.warning(
            "request %s needs more KV blocks than the cache has (%d); finishing it (length)",
            request.request_id, self.kv_cache.num_blocks,
        )
        self._finish(request, FinishReason.LENGTH)
        if request in self.running:
            self.running.remove(request)

    def _finish(
        self,
        request: Request,
        reason: FinishReason,
        stop_token_id: int | None = None,
        *,
        emit: bool = True,
    ) -> None:
        """Release everything the request holds. The caller removes it from `running`."""
        if request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(request)
        self.kv_cache.free(request)
        if self.spec is not None:
            self.spec.forget(request.request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.stop_token_id = stop_token_id
        del self.requests[request.request_id]
        self._finished_ids.append(request.request_id)
        if emit:
            out = output_of(request, [])
            out.finish_reason, out.stop_token_id = reason, stop_token_id
            self._pending_outputs.append(out)

    def check_invariants(self) -> None:
        """Block accounting matches the requests' block tables; no request is in two places."""
        check_scheduler_invariants(self.kv_cache, self.running, self.waiting, self.requests)
