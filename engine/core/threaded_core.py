"""The EngineCore on a step thread of the serving process (`--engine-core thread`): the same
step loop (engine.core.loop) and request intake (engine.core.intake) as the engine core
process, with the core's own grammar compiler, and the same client surface as
`engine.frontend.core_client.ProcessCore`. Commands cross as the same typed messages; nothing
the step thread owns (Requests, matchers) is handed to the serving side."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from engine.core.build import close_runner
from engine.core.engine_core import EngineCore
from engine.core.intake import RequestIntake
from engine.core.loop import (
    CoreCommand,
    CoreStats,
    Inbox,
    StopCore,
    run_core_loop,
    start_step_thread,
)
from engine.core.outputs import RequestOutput
from engine.kv_cache.kv_events import KvEventBatch

if TYPE_CHECKING:
    from engine.structured.compiler import GrammarCompiler

logger = logging.getLogger(__name__)


class ThreadedCore:
    def __init__(self, core: EngineCore, compiler: GrammarCompiler | None = None) -> None:
        """`compiler`: the core's grammar compiler (None: no guided decoding, e.g. an
        embedding model); stopped with the core."""
        self.core = core
        self._inbox = Inbox()
        self._on_outputs: Callable[[list[RequestOutput]], None] = lambda outputs: None
        # Compile failures reach the serving side the way step outputs do.
        self._intake = RequestIntake(self._inbox, compiler,
                                     lambda outputs: self._on_outputs(outputs))
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.last_heartbeat = 0.0

    def start(
        self,
        on_outputs: Callable[[list[RequestOutput]], None],
        on_error: Callable[[BaseException], None],
        on_kv_events: Callable[[KvEventBatch], None] = lambda batch: None,
    ) -> None:
        """`on_outputs` / `on_error` / `on_kv_events` are called on the step thread, or the
        grammar compile thread for compile failures (the caller hops threads)."""
        self.last_heartbeat = time.monotonic()  # the watchdog must not see a stale start
        self._on_outputs = on_outputs

        def run() -> None:
            try:
                run_core_loop(self.core, self._inbox, on_outputs, self._beat, on_kv_events)
            except BaseException as exc:  # the step thread must never die silently
                logger.exception("engine step thread died")
                self.error = exc
                on_error(exc)

        self._thread = start_step_thread(run)

    def _beat(self) -> None:
        self.last_heartbeat = time.monotonic()

    def send(self, command: CoreCommand) -> None:
        self._intake.put(command)

    def stop(self, timeout: float = 5.0) -> None:
        self._intake.close()
        self._inbox.put(StopCore())
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():  # no step runs: the other ranks may leave
                close_runner(self.core.runner)

    @property
    def is_alive(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    def stats(self) -> CoreStats:
        return CoreStats.of(self.core)
