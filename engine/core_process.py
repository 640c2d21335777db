"""The EngineCore in a process of its own (`--engine-core process`, engine-serve's default).

    serving process                                 engine core process
    ---------------                                 -------------------
    ProcessCore.send(command) --pickle, socket-->   reader thread -> inbox (grammars compiled
                                                    on its compile thread first)
                                                    step thread: run_core_loop
    reader thread -> on_outputs  <--pickle, socket-- CoreOutputs(outputs, stats) per step,
                                                    CoreBeat(stats) while idle

Why a process: the step loop needs the GIL between its kernels (scheduling, input
preparation, sampling, dispatching dozens of ops per layer), and the serving threads
(protobuf, gRPC streams, detokenization) hold it for a share of every step that grows with
the number of streams. In another process the two run truly in parallel; what crosses is one
small pickled message per step.

The child is started with `python -m engine.core_process_main FD` on one end of a socket pair.
It ignores SIGINT/SIGTERM (a drain must be able to finish the requests it runs; the serving
process stops it with StopCore) and exits as soon as its socket reports that the serving
process is gone.
"""
from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from engine.config import EngineConfig
from engine.core_build import ModelFacts
from engine.core_loop import CoreCommand, CoreStats, StopCore
from engine.core_messages import (
    CoreBeat,
    CoreDied,
    CoreFailed,
    CoreOutputs,
    CoreReady,
    CoreStart,
)
from engine.errors import EngineUnavailableError, ModelLoadError
from engine.outputs import RequestOutput

logger = logging.getLogger(__name__)

_STOP_KILL_GRACE_S = 5.0


class ProcessCore:
    def __init__(self, config: EngineConfig, bos_token_id: int | None) -> None:
        """Start the core process and wait until it has loaded the model and warmed up.
        Raises ModelLoadError when it cannot (the child's reason), or when it exits."""
        parent_socket, child_socket = socket.socketpair()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "engine.core_process_main", str(child_socket.fileno())],
            pass_fds=(child_socket.fileno(),),
        )
        child_socket.close()
        self._conn = Connection(parent_socket.detach())
        self._send_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None
        self.last_heartbeat = time.monotonic()
        self._conn.send(CoreStart(config, bos_token_id, logging.getLogger().getEffectiveLevel()))
        self.facts = self._wait_until_ready()
        self._stats = CoreStats(num_free_kv_blocks=self.facts.num_blocks,
                                num_kv_blocks=self.facts.num_blocks)

    def _wait_until_ready(self) -> ModelFacts:
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            message = CoreFailed(f"the engine core process exited with code "
                                 f"{self._process.wait()} while loading the model")
        if isinstance(message, CoreReady):
            return message.facts
        self._process.wait()
        self._conn.close()
        raise ModelLoadError(message.reason)

    # ----- CoreClient -----------------------------------------------------------------------

    def start(
        self,
        on_outputs: Callable[[list[RequestOutput]], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        """`on_outputs` / `on_error` are called on this object's reader thread."""
        self.last_heartbeat = time.monotonic()
        self._reader = threading.Thread(
            target=self._read, args=(on_outputs, on_error), name="engine-core-reader", daemon=True
        )
        self._reader.start()

    def send(self, command: CoreCommand) -> None:
        try:
            with self._send_lock:
                self._conn.send(command)
        except OSError:
            # The core process is gone: the reader reports that to every stream.
            if self.error is None and not self._stopping:
                logger.warning("engine core process unreachable; command dropped")

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self.send(StopCore())
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            # Hung (a test hook, or a wedged kernel): it ignores SIGTERM by design.
            self._process.kill()
            self._process.wait(_STOP_KILL_GRACE_S)
        self._conn.close()
        if self._reader is not None:
            self._reader.join(timeout)

    @property
    def is_alive(self) -> bool:
        return (self.error is None and self._reader is not None and self._reader.is_alive()
                and self._process.poll() is None)

    def stats(self) -> CoreStats:
        return self._stats

    # ----- reader thread ----------------------------------------------------------------------

    def _read(
        self,
        on_outputs: Callable[[list[RequestOutput]], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        try:
            while True:
                message = self._conn.recv()
                self.last_heartbeat = time.monotonic()
                if isinstance(message, CoreOutputs):
                    if message.stats is not None:
                        self._stats = message.stats
                    on_outputs(message.outputs)
                elif isinstance(message, CoreBeat):
                    self._stats = message.stats
                elif isinstance(message, CoreDied):
                    raise EngineUnavailableError(f"the engine core died: {message.reason}",
                                                 reason="ENGINE_DEAD")
        except (EOFError, OSError) as exc:
            if self._stopping:
                return
            error: BaseException = EngineUnavailableError(
                f"the engine core process exited (code {self._process.poll()}): {exc!r}",
                reason="ENGINE_DEAD",
            )
        except BaseException as exc:  # noqa: BLE001 - reported to every stream
            error = exc
        logger.error("engine core process stopped: %s", error)
        self.error = error
        on_error(error)
