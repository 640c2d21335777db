"""The bridge between asyncio servers and the synchronous engine core.

    asyncio side (servers)                          step thread
    ----------------------                          -----------
    generate(): tokenize, validate  --inbox-->      add / abort
                                                    core.step() in a loop
    _dispatch(): detokenize, stop   <--call_soon--  list[RequestOutput] per step
    strings -> per-request queue

The core is touched only by the step thread; streams only by the event loop. A stop-string
match is found on the asyncio side: the stream ends at once and an abort is sent to free the
request's KV blocks (at most one extra token is computed meanwhile).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.engine_core import EngineCore
from engine.errors import EngineUnavailableError, InvalidRequestError
from engine.generation import (
    GenerationEvent,
    GenerationFinished,
    GenerationRequest,
    GenerationStarted,
)
from engine.input_processor import InputProcessor
from engine.outputs import RequestOutput
from engine.request import FinishReason, Request
from engine.request_stream import RequestStream

logger = logging.getLogger(__name__)

# How long the idle step thread sleeps between heartbeats (readiness checks its freshness).
_IDLE_WAIT_S = 0.5


@dataclass(frozen=True, slots=True)
class _Add:
    requests: list[Request]


@dataclass(frozen=True, slots=True)
class _Abort:
    request_ids: list[str]
    reason: FinishReason


class _Stop:
    pass


class EngineLoop:
    def __init__(self, core: EngineCore, processor: InputProcessor) -> None:
        self.core = core
        self.processor = processor
        self._inbox: queue.SimpleQueue[_Add | _Abort | _Stop] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.last_heartbeat = 0.0

    # ----- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._inbox.put(_Stop())
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    # ----- asyncio side -------------------------------------------------------------------

    async def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Stream the events of one request (all n choices). Leaving the iterator early
        (client cancel) aborts whatever is still running."""
        if not self.is_alive:
            raise EngineUnavailableError("the engine is not running")
        if req.request_id in self._streams or f"{req.request_id}-0" in self._streams:
            raise InvalidRequestError(f"request id {req.request_id!r} is already in use", field="request_id")
        prompt = self.processor.prepare_prompt(req)
        requests = self.processor.make_requests(req, prompt)
        events: asyncio.Queue[GenerationEvent | BaseException] = asyncio.Queue()
        for index, request in enumerate(requests):
            self._streams[request.request_id] = RequestStream(
                index, request, req.request_id, events, self.processor.tokenizer, req.return_text
            )
        self._inbox.put(_Add(requests))
        pending = {r.request_id for r in requests}
        try:
            first = await self._next(events)
            yield GenerationStarted(
                req.request_id, prompt.token_ids, prompt.text, requests[0].num_cached_tokens
            )
            event: GenerationEvent | None = first
            while event is not None:
                yield event
                if isinstance(event, GenerationFinished):
                    pending.discard(requests[event.index].request_id)
                    if not pending:
                        return
                event = await self._next(events)
        finally:
            if pending:
                self.abort(sorted(pending), FinishReason.CANCELLED)

    @staticmethod
    async def _next(events: asyncio.Queue) -> GenerationEvent:
        item = await events.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def abort(self, request_ids: list[str], reason: FinishReason = FinishReason.ABORT) -> None:
        """Finish requests wherever they are. Safe to call for unknown or finished ids."""
        for request_id in request_ids:
            self._streams.pop(request_id, None)
        self._inbox.put(_Abort(list(request_ids), reason))

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
            done, stopped_early = stream.on_output(output)
            if done:
                del self._streams[output.request_id]
                if stopped_early:
                    self._inbox.put(_Abort([output.request_id], FinishReason.STOP))

    def _fail_all(self, error: BaseException) -> None:
        failure = EngineUnavailableError(f"the engine stopped: {error!r}")
        for stream in self._streams.values():
            stream.fail(failure)
        self._streams.clear()

    # ----- step thread --------------------------------------------------------------------

    def _run(self) -> None:
        assert self._loop is not None
        core = self.core
        try:
            while True:
                self.last_heartbeat = time.monotonic()
                if not self._drain_inbox(block=not core.has_unfinished_requests):
                    return
                if not core.has_unfinished_requests:
                    outputs = core.scheduler.take_pending_outputs()
                else:
                    outputs = core.step()
                if outputs:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs)
        except BaseException as exc:  # the step thread must never die silently
            logger.exception("engine step thread died")
            self.error = exc
            self._loop.call_soon_threadsafe(self._fail_all, exc)

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued adds/aborts. Returns False when asked to stop."""
        try:
            item = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if isinstance(item, _Stop):
                return False
            if isinstance(item, _Add):
                for request in item.requests:
                    self.core.add_request(request)
            else:
                self.core.abort_requests(item.request_ids, item.reason)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True
