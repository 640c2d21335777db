"""The bridge between asyncio servers and the engine core.

    asyncio side (servers)                            engine core (CoreClient)
    ----------------------                            ------------------------
    generate(): tokenize, validate --AddRequests-->   builds its Requests, compiles
                                   (CoreRequests)     constraints, steps in a loop
    _dispatch(): detokenize, stop  <--call_soon--     list[RequestOutput] per step
    strings -> per-request queue

The core runs in its own process (`ProcessCore`) or on a step thread (`ThreadedCore`); this
side is the same for both: it sends typed commands and reads RequestOutputs, and never sees
the core's Request objects (what it tracks per request, it learns from the outputs).
Streams are touched only by the event loop. A stop-string match is
found on the asyncio side: the stream ends at once and an abort is sent to free the request's
KV blocks (at most one extra token is computed meanwhile).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from engine.core.core_request import CoreRequest
from engine.core.loop import (
    AbortRequests,
    AddRequests,
    CoreCommand,
    CoreStats,
    InjectFault,
    ResetPrefixCache,
)
from engine.errors import (
    DeadlineExceededError,
    EngineUnavailableError,
    InvalidRequestError,
    SlowConsumerError,
)
from engine.generation import (
    GenerationEvent,
    GenerationFinished,
    GenerationRequest,
    GenerationStarted,
)
from engine.frontend.input_processor import InputProcessor, PreparedPrompt
from engine.frontend.kv_event_hub import KvEventHub
from engine.kv_cache.kv_events import KvEventBatch
from engine.core.outputs import RequestOutput
from engine.core.request import FinishReason
from engine.frontend.pooling_stream import PooledOutput, PoolingStream
from engine.frontend.request_stream import RequestStream

logger = logging.getLogger(__name__)
T = TypeVar("T")
# Threads that tokenize and render prompts: the Rust tokenizer releases the GIL, so two keep
# both cores of a small machine busy; more only queue behind the GIL.
PREPARE_THREADS = 2

# Events one choice may buffer for a consumer that does not read (a stalled streaming
# client): beyond it the request is cancelled, so its memory stays bounded. The n choices of
# a request share one queue, so its bound is n times this (n is capped by --max-n and its
# memory admitted against --max-request-memory): a client reading a non-streamed n=128
# answer is not a slow consumer for being handed 128 choices at once.
_MAX_BUFFERED_EVENTS_PER_CHOICE = 2048


class CoreClient(Protocol):
    """Where the EngineCore runs: `engine.core.threaded_core.ThreadedCore` or
    `engine.frontend.core_client.ProcessCore`."""

    error: BaseException | None
    last_heartbeat: float  # time.monotonic() of the core's last sign of life

    def start(
        self,
        on_outputs: Callable[[list[RequestOutput]], None],
        on_error: Callable[[BaseException], None],
        on_kv_events: Callable[[KvEventBatch], None] = ...,
    ) -> None: ...

    def send(self, command: CoreCommand) -> None: ...

    def stop(self, timeout: float = 5.0) -> None: ...

    @property
    def is_alive(self) -> bool: ...

    def stats(self) -> CoreStats: ...


class EngineLoop:
    def __init__(
        self, core: CoreClient, processor: InputProcessor, max_num_seqs: int | None = None
    ) -> None:
        self.core = core
        self.processor = processor
        # The scheduler's slots (--max-num-seqs): sequences beyond them must wait.
        self.max_num_seqs = max_num_seqs
        self._streams: dict[str, RequestStream] = {}
        # Client request id -> how many events its choices' shared queue may hold.
        self._buffer_limits: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        # Open generate() streams (drain waits on it).
        self.num_streams = 0
        # Tokenizing and chat-template rendering take milliseconds to seconds per request
        # (a long prompt, a heavy template): never on the event loop, where they would stall
        # every stream and health check. Bounded, so a burst of huge prompts queues here.
        self._prepare_pool = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="prepare")
        # Discovery/WatchKvEvents streams; the core records events only while one is open.
        self.kv_events = KvEventHub(self.core.send)

    # ----- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self.kv_events.bind(loop)
        self.core.start(
            lambda outputs: loop.call_soon_threadsafe(self._dispatch, outputs),
            lambda error: loop.call_soon_threadsafe(self._fail_all, error),
            self.kv_events.publish,
        )

    def stop(self, timeout: float = 5.0) -> None:
        # A core the watchdog declared hung (mark_dead) will never answer StopCore: waiting
        # out the grace only delays the stop, so it is stopped at once (killed, as a process).
        self.core.stop(0.0 if self._error is not None else timeout)
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)

    def num_running_choices(self, client_request_id: str) -> int:
        """Choices of a request whose last output has not reached its event queue yet."""
        return sum(1 for stream in self._streams.values()
                   if stream.client_request_id == client_request_id)

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the preparation threads (tokenizing, rendering, its checks)."""
        return await asyncio.get_running_loop().run_in_executor(self._prepare_pool, fn, *args)

    @property
    def error(self) -> BaseException | None:
        return self._error or self.core.error

    @property
    def is_alive(self) -> bool:
        return self._error is None and self.core.is_alive

    @property
    def last_heartbeat(self) -> float:
        return self.core.last_heartbeat

    def stats(self) -> CoreStats:
        return self.core.stats()

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for a slot, the queue --max-queue-len bounds: the scheduler's
        waiting queue as of its last step (which also counts waits for KV blocks), or, for
        sequences sent since, those beyond --max-num-seqs. A burst that fits in the free
        slots waits for nothing, although none of it has reached a step yet."""
        beyond_slots = len(self._streams) - self.max_num_seqs if self.max_num_seqs else 0
        return max(self.core.stats().num_requests_waiting, beyond_slots, 0)

    # ----- asyncio side -------------------------------------------------------------------

    async def generate(
        self, req: GenerationRequest, deadline: float | None = None
    ) -> AsyncIterator[GenerationEvent]:
        """Stream the events of one request (all n choices). Leaving the iterator early
        (client cancel) aborts whatever is still running. `deadline` (event-loop time) evicts
        the request from the queue or stops its decoding when it passes: the request is
        aborted with FinishReason.DEADLINE and DeadlineExceededError is raised."""
        if not self.is_alive:
            raise EngineUnavailableError("the engine is not running")
        if req.request_id in self._streams or f"{req.request_id}-0" in self._streams:
            raise InvalidRequestError(f"request id {req.request_id!r} is already in use", field="request_id")
        _check_deadline(deadline, "before it was queued")
        prompt, requests = await self.off_loop(self._prepare, req)
        if req.request_id in self._streams or f"{req.request_id}-0" in self._streams:
            # Another request took the id while this one was being prepared.
            raise InvalidRequestError(f"request id {req.request_id!r} is already in use", field="request_id")
        # Guided decoding: the constraint is validated off the event loop (the core compiles
        # it, while its step thread keeps going).
        await self.processor.check_constraint(req)
        _check_deadline(deadline, "before it was queued")
        requests = _with_deadline(requests, deadline)
        events: asyncio.Queue[GenerationEvent | BaseException] = asyncio.Queue()
        streams = [
            RequestStream(index, req.request_id, request.prompt_token_ids,
                          request.sampling_params, events, self.processor.tokenizer,
                          req.return_text)
            for index, request in enumerate(requests)
        ]
        for request, stream in zip(requests, streams):
            self._streams[request.request_id] = stream
        self._buffer_limits[req.request_id] = _MAX_BUFFERED_EVENTS_PER_CHOICE * len(streams)
        self.core.send(AddRequests(requests))
        pending = {r.request_id for r in requests}
        self.num_streams += 1
        try:
            first = _unless_evicted(await self._next(events, deadline))
            # The streams learned them from the outputs dispatched before this wake-up.
            scheduled = [s.first_scheduled_time for s in streams
                         if s.first_scheduled_time is not None]
            yield GenerationStarted(
                req.request_id, prompt.token_ids, prompt.text, streams[0].num_cached_tokens,
                prompt_logprobs=getattr(first, "prompt_logprobs", None),
                scheduled_at=min(scheduled, default=None), max_tokens=requests[0].max_tokens,
            )
            event: GenerationEvent | None = first
            while event is not None:
                yield event
                if isinstance(event, GenerationFinished):
                    pending.discard(requests[event.index].request_id)
                    if not pending:
                        return
                event = _unless_evicted(await self._next(events, deadline))
        finally:
            self.num_streams -= 1
            self._buffer_limits.pop(req.request_id, None)
            if pending:
                # The gRPC layer may cancel us at the deadline before our own timer fires:
                # the time decides which reason metrics and logs see.
                expired = deadline is not None and asyncio.get_running_loop().time() >= deadline
                reason = FinishReason.DEADLINE if expired else FinishReason.CANCELLED
                self.abort(sorted(pending), reason)

    def _prepare(self, req: GenerationRequest) -> tuple[PreparedPrompt, list[CoreRequest]]:
        prompt = self.processor.prepare_prompt(req)
        return prompt, self.processor.make_requests(req, prompt)

    async def embed(
        self, client_request_id: str, requests: list[CoreRequest], deadline: float | None = None
    ) -> list[PooledOutput]:
        """Run embedding requests (one per input, already validated) through the same
        scheduler queue as generation; returns their outputs in input order. Cancellation or
        the deadline aborts whatever has not finished."""
        if not self.is_alive:
            raise EngineUnavailableError("the engine is not running")
        if any(request.request_id in self._streams for request in requests):
            raise InvalidRequestError(
                f"request id {client_request_id!r} is already in use", field="request_id"
            )
        _check_deadline(deadline, "before it was queued")
        requests = _with_deadline(requests, deadline)
        events: asyncio.Queue[PooledOutput | BaseException] = asyncio.Queue()
        for index, request in enumerate(requests):
            self._streams[request.request_id] = PoolingStream(  # type: ignore[assignment]
                index, request.request_id, client_request_id, events
            )
        self.core.send(AddRequests(requests))
        pending = {request.request_id for request in requests}
        results: list[PooledOutput | None] = [None] * len(requests)
        try:
            while pending:
                pooled = await self._next(events, deadline)
                if pooled.output.finish_reason is FinishReason.DEADLINE:
                    raise DeadlineExceededError(_EVICTED)
                results[pooled.index] = pooled
                pending.discard(requests[pooled.index].request_id)
        finally:
            if pending:
                expired = deadline is not None and asyncio.get_running_loop().time() >= deadline
                self.abort(sorted(pending), FinishReason.DEADLINE if expired else FinishReason.CANCELLED)
        return [pooled for pooled in results if pooled is not None]

    @staticmethod
    async def _next(events: asyncio.Queue, deadline: float | None = None) -> GenerationEvent:
        if deadline is None or not events.empty():
            item = await events.get()
        else:
            try:
                async with asyncio.timeout_at(deadline):
                    item = await events.get()
            except TimeoutError:
                raise DeadlineExceededError("the request's deadline expired") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def abort(self, request_ids: list[str], reason: FinishReason = FinishReason.ABORT) -> None:
        """Finish requests wherever they are. Safe to call for unknown or finished ids."""
        for request_id in request_ids:
            self._streams.pop(request_id, None)
        self.core.send(AbortRequests(list(request_ids), reason))

    def abort_by_client_id(self, request_ids: list[str]) -> list[str]:
        """Admin abort by the id the client used (covers the n children of a request)."""
        wanted = set(request_ids)
        found = [rid for rid, s in self._streams.items() if s.client_request_id in wanted]
        client_ids = sorted({self._streams[rid].client_request_id for rid in found})
        for request_id in found:
            self._streams[request_id].finish(FinishReason.ABORT)
        self.abort(found, FinishReason.ABORT)
        return client_ids

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # aborted or stopped by a stop string meanwhile
            limit = self._buffer_limits.get(stream.client_request_id,
                                            _MAX_BUFFERED_EVENTS_PER_CHOICE)
            if stream.events.qsize() > limit:
                del self._streams[output.request_id]
                stream.fail(SlowConsumerError("the client stopped reading its stream"))
                self.core.send(AbortRequests([output.request_id], FinishReason.CANCELLED))
                continue
            done, stopped_early = stream.on_output(output)
            if done:
                del self._streams[output.request_id]
                if stopped_early:
                    self.core.send(AbortRequests([output.request_id], FinishReason.STOP))

    def reset_prefix_cache(self) -> None:
        """Admin/ResetPrefixCache: the core forgets every cached hash (watchers of KV events
        get AllBlocksCleared)."""
        self.core.send(ResetPrefixCache())

    def inject_fault(self, kind: str) -> None:
        """Test hook: the step loop raises ("die") or blocks forever ("hang")."""
        self.core.send(InjectFault(kind))

    def mark_dead(self, error: BaseException) -> None:
        """The step thread hangs (no heartbeat): declare the engine dead from the event loop
        so new requests are refused and every open stream ends now instead of hanging."""
        if self._error is None:
            self._error = error
        self._fail_all(error)

    def _fail_all(self, error: BaseException) -> None:
        failure = EngineUnavailableError(f"the engine stopped: {error!r}")
        for stream in self._streams.values():
            stream.fail(failure)
        self._streams.clear()
        self.kv_events.fail(failure)


_EVICTED = "the request's deadline expired while it waited in the queue"


def _check_deadline(deadline: float | None, when: str) -> None:
    """A deadline already past never reaches the step thread (no tokenizing, no queueing)."""
    if deadline is not None and asyncio.get_running_loop().time() >= deadline:
        raise DeadlineExceededError(f"the request's deadline expired {when}")


def _with_deadline(requests: list[CoreRequest], deadline: float | None) -> list[CoreRequest]:
    """Hand the deadline to the scheduler, which evicts the request instead of admitting it
    once it passes. Converted from event-loop time to time.monotonic(), the step thread's
    clock (an event loop may keep its own)."""
    if deadline is None:
        return requests
    at = time.monotonic() + (deadline - asyncio.get_running_loop().time())
    return [replace(request, deadline=at) for request in requests]


def _unless_evicted(event: GenerationEvent) -> GenerationEvent:
    """The scheduler finished the request with DEADLINE: it expired in the queue (it never
    ran, or waited after a preemption). The caller sees the same error as from the timer."""
    if isinstance(event, GenerationFinished) and event.reason is FinishReason.DEADLINE:
        raise DeadlineExceededError(_EVICTED)
    return event
