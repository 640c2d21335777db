"""One daemon thread with a large stack, as an Executor: where grammars are compiled (the
core's GrammarCompiler) and validated (the serving side's ConstraintValidator).

Grammar libraries recurse over a grammar's structure, and a deeply nested grammar (a few
thousand chained Lark rules) overflows a default 8 MiB thread stack, which would take the
whole process down instead of failing one request.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future

WORKER_STACK_BYTES = 512 * 2**20


class BigStackWorker(Executor):
    """One daemon thread with a large stack, as an Executor. Not a ThreadPoolExecutor: the
    interpreter joins those at exit, so a server stopped right after it started would wait
    for the grammar warm-up (seconds for a large vocabulary); a daemon thread is dropped."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Future, Callable, tuple, dict] | None] = (
            queue.SimpleQueue())
        self._shut_down = False
        # `threading.stack_size` applies to threads created while it is set.
        previous = threading.stack_size(WORKER_STACK_BYTES)
        try:
            threading.Thread(target=self._run, name=name, daemon=True).start()
        finally:
            threading.stack_size(previous)

    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:
        if self._shut_down:
            raise RuntimeError("the grammar worker is closed")
        future: Future = Future()
        self._queue.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shut_down = True
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on it
                future.set_exception(exc)
