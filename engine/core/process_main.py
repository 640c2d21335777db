"""Entry point of the engine core process: `python -m engine.core.process_main FD`.

FD is this process's end of a socket pair with the serving process (`engine.frontend.core_client`).
The first message is CoreStart; the reply is CoreReady or CoreFailed (engine.core.messages).
Then commands arrive and
outputs leave until StopCore (then exit at once: os._exit, no interpreter teardown), or until
the socket closes (the serving process is gone: exit at once, nothing is waiting for our
outputs).

Threads: the step thread owns the EngineCore (run_core_loop); the reader thread hands
commands to the request intake (engine.core.intake): requests with an output constraint get
their grammar matchers from this process's compiler, the only one, on its compile thread
first, so a slow grammar never stalls the steps of others.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from engine.core.build import build_core, close_runner, load_tokenizer, make_grammar_compiler
from engine.core.intake import RequestIntake
from engine.core.loop import IDLE_WAIT_S, CoreStats, Inbox, run_core_loop, start_step_thread
from engine.core.messages import (
    CoreBeat,
    CoreDied,
    CoreFailed,
    CoreKvEvents,
    CoreOutputs,
    CoreReady,
    CoreStart,
)
from engine.core.engine_core import EngineCore
from engine.core.outputs import RequestOutput
from engine.structured.compiler import GrammarCompiler

logger = logging.getLogger(__name__)


CoreMessage = CoreReady | CoreFailed | CoreOutputs | CoreKvEvents | CoreBeat | CoreDied


class _Channel:
    """Sends to the serving process from the step thread and the compile thread."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()
        self.last_sent = 0.0

    def send(self, message: CoreMessage) -> None:
        with self._lock:
            self.conn.send(message)
            self.last_sent = time.monotonic()


class _CommandReader:
    """Reader thread: commands -> the core's request intake (engine.core.intake), which
    compiles constrained requests' grammars before they reach the inbox."""

    def __init__(
        self,
        channel: _Channel,
        inbox: Inbox,
        compiler: GrammarCompiler | None,
        on_disconnect: Callable[[], None] = lambda: os._exit(0),
    ) -> None:
        self.channel = channel
        # Compile failures go back at once, without fresh stats (sent off the step thread).
        self.intake = RequestIntake(inbox, compiler,
                                    lambda outputs: channel.send(CoreOutputs(outputs, None)))
        # The serving process is gone: nothing waits for our outputs, so exit at once.
        self.on_disconnect = on_disconnect

    def run(self) -> None:
        try:
            while True:
                self.intake.put(self.channel.conn.recv())
        except (EOFError, OSError):
            self.on_disconnect()


def _serve(core: EngineCore, channel: _Channel, compiler: GrammarCompiler | None) -> int:
    """Run the step loop until StopCore (0) or until it dies (1, reported to the server)."""
    inbox = Inbox()
    reader = _CommandReader(channel, inbox, compiler)
    threading.Thread(target=reader.run, name="core-commands", daemon=True).start()

    def emit(outputs: list[RequestOutput]) -> None:
        channel.send(CoreOutputs(outputs, CoreStats.of(core)))

    def beat() -> None:
        # Keeps the serving side's heartbeat and load numbers fresh while nothing is emitted.
        if time.monotonic() - channel.last_sent >= IDLE_WAIT_S / 2:
            channel.send(CoreBeat(CoreStats.of(core)))

    failure: list[BaseException] = []

    def step_loop() -> None:
        try:
            run_core_loop(core, inbox, emit, beat,
                          lambda batch: channel.send(CoreKvEvents(batch)))
        except BaseException as exc:  # reported to the serving process, which ends streams
            logger.exception("engine step loop died")
            failure.append(exc)

    start_step_thread(step_loop).join()
    if failure:
        try:
            channel.send(CoreDied(repr(failure[0])))
        except OSError:
            pass
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # A drain in the serving process must be able to finish what runs here; the serving
    # process stops us with StopCore, or we exit when its socket closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    channel = _Channel(Connection(int(argv[0])))
    start: CoreStart = channel.conn.recv()
    config = start.config
    logging.basicConfig(level=start.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loading = threading.Event()
    loading.set()
    threading.Thread(target=_exit_if_orphaned, args=(channel.conn, loading), daemon=True).start()
    try:
        core, facts = build_core(config, start.bos_token_id)
        # The serving process loaded the same tokenizer and said what it found: only the
        # grammar backend's token table needs it here.
        compiler = make_grammar_compiler(config, facts, load_tokenizer(config, announce=False))
    except BaseException as exc:  # noqa: BLE001 - the serving process reports it
        channel.send(CoreFailed(str(exc) or repr(exc)))
        return 1
    finally:
        loading.clear()
    channel.send(CoreReady(facts))
    code = _serve(core, channel, compiler)
    close_runner(core.runner)
    if compiler is not None:
        compiler.close()  # a warm-up still running may fail now; that is no news
    # Nothing here needs an orderly interpreter teardown: with torch and the model loaded its
    # final garbage collection alone takes a second or more (several on a busy machine), and
    # it would wait for the grammar warm-up thread. The serving process waits for this exit.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_if_orphaned(conn: Connection, loading: threading.Event) -> None:
    """While the model loads nobody reads the socket: a large model can take minutes, and a
    serving process that died meanwhile must not leave us holding the memory. The serving
    process sends nothing until CoreReady, so a readable socket here means it closed."""
    fd = conn.fileno()
    while loading.is_set():
        readable, _, _ = select.select([fd], [], [], 0.5)
        if readable and loading.is_set():
            os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
