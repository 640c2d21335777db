"""The step loop around an EngineCore, and the commands that reach it.

    commands (AddRequests, AbortRequests, ...) --inbox--> run_core_loop: apply, step, emit

The same loop runs on a thread of the serving process (`ThreadedCore`, `--engine-core
thread`) or in a process of its own (`engine.frontend.core_client`, the default for engine-serve),
where the serving threads never compete with it for the GIL. Either way one thread owns the
EngineCore; everything else talks to it through the inbox and hears back through `emit`.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.core.engine_core import EngineCore
from engine.core.outputs import RequestOutput
from engine.core.request import FinishReason, Request
from protoserve.histogram import Histogram

logger = logging.getLogger(__name__)

# How long an idle loop waits for a command before it beats its heartbeat again.
IDLE_WAIT_S = 0.5
# Grammar masks are computed on the step thread, and deeply nested grammars recurse deep
# inside the grammar library: it gets the same large stack as the grammar compile thread.
STEP_THREAD_STACK_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class AddRequests:
    requests: list[Request]


@dataclass(frozen=True, slots=True)
class AbortRequests:
    request_ids: list[str]
    reason: FinishReason


@dataclass(frozen=True, slots=True)
class StopCore:
    pass


@dataclass(frozen=True, slots=True)
class InjectFault:
    """Test hook (only reachable with --enable-test-hooks): make the step loop die or hang."""

    kind: str  # "die" | "hang"


CoreCommand = AddRequests | AbortRequests | StopCore | InjectFault


@dataclass(frozen=True, slots=True)
class CoreStats:
    """Scheduler and KV numbers for metrics and Discovery/GetLoad, read off the core."""

    num_requests_running: int = 0
    num_requests_waiting: int = 0
    num_preemptions: int = 0
    kv_cache_usage: float = 0.0
    num_free_kv_blocks: int = 0
    num_kv_blocks: int = 0
    num_hit_tokens: int = 0
    num_queried_tokens: int = 0
    # A copy of the tokens-computed-per-step histogram.
    iteration_tokens: Histogram | None = None

    @classmethod
    def of(cls, core: EngineCore) -> CoreStats:
        """Plain int/float reads: safe from another thread, never waits for a step."""
        scheduler, kv = core.scheduler, core.kv_cache
        return cls(
            num_requests_running=scheduler.num_running,
            num_requests_waiting=scheduler.num_waiting,
            num_preemptions=scheduler.num_preemptions,
            kv_cache_usage=kv.usage,
            num_free_kv_blocks=kv.pool.num_free_blocks,
            num_kv_blocks=kv.pool.num_blocks,
            num_hit_tokens=kv.num_hit_tokens,
            num_queried_tokens=kv.num_queried_tokens,
            iteration_tokens=core.iteration_tokens.snapshot(),
        )


class Inbox:
    """Commands for the step loop, from any thread."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[CoreCommand] = queue.SimpleQueue()

    def put(self, command: CoreCommand) -> None:
        self._queue.put(command)

    def get(self, block: bool) -> CoreCommand | None:
        try:
            return self._queue.get(timeout=IDLE_WAIT_S) if block else self._queue.get_nowait()
        except queue.Empty:
            return None


def run_core_loop(
    core: EngineCore,
    inbox: Inbox,
    emit: Callable[[list[RequestOutput]], None],
    beat: Callable[[], None],
) -> None:
    """Apply commands, step while there is work, hand every non-empty output list to `emit`.
    `beat` is called at least every IDLE_WAIT_S while idle and before each step. Returns on
    StopCore; raises whatever the core raises (the caller reports it)."""
    while True:
        beat()
        if not _apply_commands(core, inbox, block=not core.has_unfinished_requests):
            return
        if not core.has_unfinished_requests:
            outputs = core.scheduler.take_pending_outputs()
        else:
            outputs = core.step()
        if outputs:
            emit(outputs)


def _apply_commands(core: EngineCore, inbox: Inbox, block: bool) -> bool:
    """Apply queued adds/aborts. Returns False when asked to stop."""
    command = inbox.get(block)
    while command is not None:
        if isinstance(command, StopCore):
            return False
        if isinstance(command, InjectFault):
            if command.kind == "hang":
                threading.Event().wait()
            raise RuntimeError("step loop killed by a test hook")
        if isinstance(command, AddRequests):
            for request in command.requests:
                core.add_request(request)
        else:
            core.abort_requests(command.request_ids, command.reason)
        command = inbox.get(block=False)
    return True


def start_step_thread(target: Callable[[], None], name: str = "engine-step") -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    previous = threading.stack_size(STEP_THREAD_STACK_BYTES)
    try:
        thread.start()
    finally:
        threading.stack_size(previous)
    return thread


class ThreadedCore:
    """The EngineCore on a step thread of this process (`--engine-core thread`)."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._inbox = Inbox()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.last_heartbeat = 0.0

    def start(
        self,
        on_outputs: Callable[[list[RequestOutput]], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        """`on_outputs` / `on_error` are called on the step thread (the caller hops threads)."""
        self.last_heartbeat = time.monotonic()  # the watchdog must not see a stale start

        def run() -> None:
            try:
                run_core_loop(self.core, self._inbox, on_outputs, self._beat)
            except BaseException as exc:  # the step thread must never die silently
                logger.exception("engine step thread died")
                self.error = exc
                on_error(exc)

        self._thread = start_step_thread(run)

    def _beat(self) -> None:
        self.last_heartbeat = time.monotonic()

    def send(self, command: CoreCommand) -> None:
        self._inbox.put(command)

    def stop(self, timeout: float = 5.0) -> None:
        self._inbox.put(StopCore())
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    def stats(self) -> CoreStats:
        return CoreStats.of(self.core)
