"""The EngineCore in a process of its own (`--engine-core process`, engine-serve's default).

    serving process                                 engine core process
    ---------------                                 -------------------
    ProcessCore.send(command) --pickle, socket-->   reader thread -> request intake -> inbox
    (AddRequests of CoreRequests, AbortRequests)    (constraints compiled by the core's own
                                                    compiler, on its compile thread, first)
                                                    step thread: run_core_loop
    reader thread -> on_outputs  <--pickle, socket-- CoreOutputs(outputs, stats) per step,
                 -> on_kv_events                    CoreKvEvents(batch) per step (if on),
                                                    CoreBeat(stats) while idle

Why a process: the step loop needs the GIL between its kernels (scheduling, input
preparation, sampling, dispatching dozens of ops per layer), and the serving threads
(protobuf, gRPC streams, detokenization) hold it for a share of every step that grows with
the number of streams. In another process the two run truly in parallel; what crosses is one
small pickled message per step.

The child is started with `python -m engine.core.process_main FD` on one end of a socket pair.
It ignores SIGINT/SIGTERM (a drain must be able to finish the requests it runs; the serving
process stops it with StopCore) and exits as soon as its socket reports that the serving
process is gone.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from engine.config import EngineConfig
from engine.core.build import ModelFacts
from engine.core.loop import CoreCommand, CoreStats, StopCore
from engine.core.messages import (
    CoreBeat,
    CoreDied,
    CoreFailed,
    CoreKvEvents,
    CoreOutputs,
    CoreReady,
    CoreStart,
)
from engine.errors import EngineUnavailableError, ModelLoadError
from engine.core.outputs import RequestOutput
from engine.kv_cache.kv_events import KvEventBatch

logger = logging.getLogger(__name__)

_STOP_KILL_GRACE_S = 5.0
# How long the reader waits for an exit status after the socket closed (the process is dying).
_EXIT_STATUS_WAIT_S = 2.0

# Core processes still loading their model. A server that must stop meanwhile kills them
# (abort_starting), so that it does not wait minutes for a large model to finish loading.
_starting: set[subprocess.Popen] = set()
_starting_lock = threading.Lock()
_aborted = False


def abort_starting() -> None:
    """Kill every core process still loading, and refuse to start more: each ProcessCore
    being built raises ModelLoadError. For a server that is stopping."""
    global _aborted
    with _starting_lock:
        _aborted = True
        for process in _starting:
            process.kill()


def _track_starting(process: subprocess.Popen) -> None:
    with _starting_lock:
        _starting.add(process)
        if _aborted:  # the server stopped while this one was being spawned
            process.kill()


def describe_exit(code: int | None) -> str:
    """'was killed by SIGKILL' / 'exited with status 3', for a process's exit code."""
    if code is None:
        return "closed its socket"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        # SIGKILL out of nowhere is most often the kernel's OOM killer.
        hint = " (out of memory?)" if code == -signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {code}"


def core_process_env() -> dict[str, str]:
    """The core process's environment: OpenMP's threads sleep as soon as a torch op's region
    ends (OMP_WAIT_POLICY=PASSIVE) unless the deployer set a policy. Our kernels run on their
    own work pool (csrc/cpu/work_pool.cpp); OpenMP's default, spinning after every region,
    takes the core from the pool's worker: 0.90-0.93x at batch 16 on a quiet 2-core machine,
    against 1.00-1.03x with PASSIVE (benchmarks/shared_cores.py)."""
    env = dict(os.environ)
    if env.get("PROTOSERVE_WORK_POOL") != "0":
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


class ProcessCore:
    def __init__(self, config: EngineConfig, bos_token_id: Callable[[], int | None]) -> None:
        """Start the core process and wait until it has loaded the model and warmed up.
        Raises ModelLoadError when it cannot (the child's reason), or when it exits.

        `bos_token_id` is called once the child is spawned: the serving process loads its
        tokenizer while the child imports torch (seconds each), and the child needs the id
        only for its warm-up request. If it raises, the child is killed and the error
        propagates."""
        parent_socket, child_socket = socket.socketpair()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "engine.core.process_main", str(child_socket.fileno())],
            pass_fds=(child_socket.fileno(),),
            env=core_process_env(),
        )
        _track_starting(self._process)
        child_socket.close()
        self._conn = Connection(parent_socket.detach())
        self._send_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None
        self.last_heartbeat = time.monotonic()
        try:
            try:
                warm_up_token_id = bos_token_id()
            except BaseException:
                self._process.kill()
                self._process.wait()
                self._conn.close()
                raise
            try:
                self._conn.send(CoreStart(config, warm_up_token_id,
                                          logging.getLogger().getEffectiveLevel()))
            except OSError:
                pass  # it is gone already: _wait_until_ready says how
            self.facts = self._wait_until_ready()
        finally:
            with _starting_lock:
                _starting.discard(self._process)
        # Until the first step's stats arrive; max_lora is known from the start (routers
        # read it from lora_requests_info before any request ran).
        self._stats = CoreStats(num_free_kv_blocks=self.facts.num_blocks,
                                num_kv_blocks=self.facts.num_blocks,
                                max_lora=config.lora.max_loras if config.lora else 0)

    def _wait_until_ready(self) -> ModelFacts:
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            message = CoreFailed(f"the engine core process {describe_exit(self._process.wait())} "
                                 f"while loading the model")
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
        on_kv_events: Callable[[KvEventBatch], None] = lambda batch: None,
    ) -> None:
        """`on_outputs` / `on_error` / `on_kv_events` are called on this object's reader
        thread."""
        self.last_heartbeat = time.monotonic()
        self._reader = threading.Thread(
            target=self._read, args=(on_outputs, on_error, on_kv_events),
            name="engine-core-reader", daemon=True,
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
        # Not the process's exit status: a dead core closes its socket, and the reader thread
        # records how it ended (`error`) before it stops, so whoever sees the core dead here
        # also sees why.
        return self.error is None and self._reader is not None and self._reader.is_alive()

    def stats(self) -> CoreStats:
        return self._stats

    # ----- reader thread ----------------------------------------------------------------------

    def _read(
        self,
        on_outputs: Callable[[list[RequestOutput]], None],
        on_error: Callable[[BaseException], None],
        on_kv_events: Callable[[KvEventBatch], None],
    ) -> None:
        try:
            while True:
                message = self._conn.recv()
                self.last_heartbeat = time.monotonic()
                if isinstance(message, CoreOutputs):
                    if message.stats is not None:
                        self._stats = message.stats
                    on_outputs(message.outputs)
                elif isinstance(message, CoreKvEvents):
                    on_kv_events(message.batch)
                elif isinstance(message, CoreBeat):
                    self._stats = message.stats
                elif isinstance(message, CoreDied):
                    raise EngineUnavailableError(f"the engine core died: {message.reason}",
                                                 reason="ENGINE_DEAD")
        except (EOFError, OSError):
            if self._stopping:
                return
            try:
                code = self._process.wait(_EXIT_STATUS_WAIT_S)
            except subprocess.TimeoutExpired:
                code = None
            error: BaseException = EngineUnavailableError(
                f"the engine core process (pid {self._process.pid}) {describe_exit(code)}",
                reason="ENGINE_DEAD",
            )
        except BaseException as exc:  # noqa: BLE001 - reported to every stream
            error = exc
        # engine-serve logs the one error line, with this reason (serve_loop.py).
        logger.debug("engine core process stopped: %s", error)
        self.error = error
        on_error(error)
