"""The step loop around an EngineCore, and the commands that reach it.

    commands (AddRequests, AbortRequests, ...) --RequestIntake--> inbox
        --> run_core_loop: apply, step, emit

The same loop runs on a thread of the serving process (`engine.core.threaded_core`,
`--engine-core thread`) or in a process of its own (`engine.core.process_main`, the default
for engine-serve), where the serving threads never compete with it for the GIL. Either way
one thread owns the EngineCore; everything else talks to it through the inbox (by way of the
core's request intake, `engine.core.intake`) and hears back through `emit`.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.core.core_request import CoreRequest
from engine.core.engine_core import EngineCore
from engine.core.outputs import RequestOutput
from engine.core.request import FinishReason, Request
from engine.kv_cache.kv_events import KvEventBatch
from engine.spec_decode.proposals import SpecDecodeStats
from protoserve.histogram import Histogram

if TYPE_CHECKING:
    from engine.structured.grammar import Grammar

# How long an idle loop waits for a command before it beats its heartbeat again.
IDLE_WAIT_S = 0.5
# Grammar masks are computed on the step thread, and deeply nested grammars recurse deep
# inside the grammar library: it gets the same large stack as the grammar compile thread.
STEP_THREAD_STACK_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class AddRequests:
    requests: list[CoreRequest]


@dataclass(frozen=True, slots=True)
class AddCompiled:
    """Core-internal, never pickled: requests with an output constraint and their matchers,
    put in the inbox by the grammar compile thread (engine.core.intake)."""

    requests: list[CoreRequest]
    grammars: list[Grammar | None]


@dataclass(frozen=True, slots=True)
class AbortRequests:
    request_ids: list[str]
    reason: FinishReason


@dataclass(frozen=True, slots=True)
class SetKvEvents:
    """Start or stop recording KV-cache events (engine.kv_cache.kv_events): the serving
    side turns them on while at least one Discovery/WatchKvEvents stream is open."""

    enabled: bool


@dataclass(frozen=True, slots=True)
class ResetPrefixCache:
    """Forget every prefix-cache hash (blocks in use keep their KV but are found no more)."""


@dataclass(frozen=True, slots=True)
class StopCore:
    pass


@dataclass(frozen=True, slots=True)
class InjectFault:
    """Test hook (only reachable with --enable-test-hooks): make the step loop die or hang."""

    kind: str  # "die" | "hang"


# What the serving side sends; the inbox also takes AddCompiled from inside the core.
CoreCommand = (
    AddRequests | AbortRequests | SetKvEvents | ResetPrefixCache | StopCore | InjectFault
)
InboxEntry = CoreCommand | AddCompiled


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
    # A copy of the speculative decoding counters (None: speculation off).
    spec_decode: SpecDecodeStats | None = None
    # --enable-lora: the adapters of running and of waiting requests (names, first seen
    # first) and --max-loras; 0 with LoRA off.
    running_lora_adapters: tuple[str, ...] = ()
    waiting_lora_adapters: tuple[str, ...] = ()
    max_lora: int = 0

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
            spec_decode=scheduler.spec.stats.copy() if scheduler.spec is not None else None,
            # tuple() copies in one C call: another thread's step cannot change it midway.
            running_lora_adapters=_adapter_names(tuple(scheduler.running), scheduler.max_loras),
            waiting_lora_adapters=_adapter_names(tuple(scheduler.waiting), scheduler.max_loras),
            max_lora=scheduler.max_loras or 0,
        )


def _adapter_names(requests: tuple[Request, ...], max_loras: int | None) -> tuple[str, ...]:
    if max_loras is None:  # LoRA off: no request has an adapter
        return ()
    return tuple(dict.fromkeys(r.lora.name for r in requests if r.lora is not None))


class Inbox:
    """Commands for the step loop, from any thread."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[InboxEntry] = queue.SimpleQueue()

    def put(self, command: InboxEntry) -> None:
        self._queue.put(command)

    def get(self, block: bool) -> InboxEntry | None:
        try:
            return self._queue.get(timeout=IDLE_WAIT_S) if block else self._queue.get_nowait()
        except queue.Empty:
            return None


def run_core_loop(
    core: EngineCore,
    inbox: Inbox,
    emit: Callable[[list[RequestOutput]], None],
    beat: Callable[[], None],
    emit_kv_events: Callable[[KvEventBatch], None] = lambda batch: None,
) -> None:
    """Apply commands, step while there is work, hand every non-empty output list to `emit`
    and, while KV events are on, each step's event batch to `emit_kv_events`. `beat` is
    called at least every IDLE_WAIT_S while idle and before each step. Returns on
    StopCore; raises whatever the core raises (the caller reports it)."""
    kv_events = core.kv_cache.pool.events
    # Model-parallel runners check their ranks while idle (ModelRunner.keep_alive).
    keep_alive: Callable[[], None] = getattr(core.runner, "keep_alive", lambda: None)
    while True:
        beat()
        if not _apply_commands(core, inbox, block=not core.has_unfinished_requests):
            return
        if not core.has_unfinished_requests:
            outputs = core.scheduler.take_pending_outputs()
            keep_alive()
        else:
            outputs = core.step()
        if outputs:
            emit(outputs)
        if kv_events.enabled:
            batch = kv_events.take_batch()
            if batch is not None:
                emit_kv_events(batch)


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
        elif isinstance(command, SetKvEvents):
            core.kv_cache.pool.events.set_enabled(command.enabled)
        elif isinstance(command, ResetPrefixCache):
            core.kv_cache.pool.reset_prefix_cache()
        elif isinstance(command, AddCompiled):
            for request, grammar in zip(command.requests, command.grammars, strict=True):
                core.add_request(request, grammar)
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
