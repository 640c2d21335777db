"""Compiles request constraints into per-choice Grammars, off the step thread, with a bounded
LRU of compiled grammars.

The cache key is (backend, kind, text, whitespace pattern); the tokenizer is fixed per
compiler (one compiler per served model), so it is part of the key implicitly.

Compilation runs on this compiler's own worker thread, never on the step thread, so requests
already running keep decoding while a large grammar compiles. The worker gets a large stack:
grammar libraries recurse over the grammar's structure, and a deeply nested grammar (a few
thousand chained Lark rules) overflows a default 8 MiB thread stack, which would take the
whole process down instead of failing one request.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor, Future

from engine.errors import EngineError, UnsupportedError
from engine.structured.constraint import OutputConstraint

from engine.structured.grammar import CompiledGrammar, Grammar, GrammarBackend, TokenizerInfo
from engine.structured.registry import DEFAULT_BACKEND, check_backend, create_backend

DEFAULT_CACHE_SIZE = 256
_WORKER_STACK_BYTES = 512 * 2**20

_CacheKey = tuple[str, str, str, str | None]


class GrammarCompiler:
    def __init__(
        self,
        info: TokenizerInfo,
        *,
        default_backend: str = DEFAULT_BACKEND,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        check_backend(default_backend, field="guided_decoding_backend")
        self.info = info
        self.default_backend = default_backend
        self.cache_size = cache_size
        self._backends: dict[str, GrammarBackend] = {}
        self._cache: OrderedDict[_CacheKey, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._executor: _DaemonWorker | None = None
        self._closed = False
        self.num_cache_hits = 0
        self.num_cache_misses = 0

    # ----- asyncio side ---------------------------------------------------------------------

    async def new_grammars_async(self, constraint: OutputConstraint, n: int) -> list[Grammar]:
        """Compile (or fetch from the cache) on the worker thread; one Grammar per choice."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker(), self.new_grammars, constraint, n)

    def submit(self, job: Callable[[], None]) -> Future:
        """Run `job` (which compiles) on the worker thread, from a thread without an event
        loop (the engine core process's command reader)."""
        return self._worker().submit(job)

    # ----- any thread but the step thread ---------------------------------------------------

    def new_grammars(self, constraint: OutputConstraint, n: int) -> list[Grammar]:
        compiled = self.compile(constraint)
        return [compiled.new_grammar() for _ in range(n)]

    def compile(self, constraint: OutputConstraint) -> CompiledGrammar:
        """Raises InvalidRequestError (naming the constraint's field) for a bad constraint."""
        constraint.validate()
        backend_name = constraint.backend or self.default_backend
        check_backend(backend_name)
        key = (backend_name, constraint.kind.value, constraint.spec, constraint.whitespace_pattern)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                self.num_cache_hits += 1
                return compiled
            self.num_cache_misses += 1
        # Compiled outside the lock: a slow grammar must not hold up cache hits. Two threads
        # compiling the same key at once both succeed; the later insert wins, harmlessly.
        compiled = self.backend(backend_name).compile(constraint)
        with self._lock:
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def backend(self, name: str) -> GrammarBackend:
        with self._lock:
            backend = self._backends.get(name)
        if backend is None:
            # Built outside the lock (a large vocabulary takes ~1 s); a rare duplicate is fine.
            try:
                backend = create_backend(name, self.info)
            except EngineError:
                raise
            except Exception as exc:  # the library refused this tokenizer
                raise UnsupportedError(
                    f"guided decoding backend {name!r} cannot use this model's tokenizer: {exc}",
                    field="constraint.backend",
                ) from exc
            with self._lock:
                backend = self._backends.setdefault(name, backend)
        return backend

    @property
    def cache_len(self) -> int:
        return len(self._cache)

    def warm_up(self) -> None:
        """Build the default backend's token tables now rather than on the first request."""
        self.backend(self.default_backend)

    def close(self) -> None:
        """Drop queued jobs; one already running finishes (or fails: see `closed`)."""
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def closed(self) -> bool:
        """True once the server stops: a job failing then (a library import racing the
        interpreter's shutdown) is not a fault worth reporting."""
        return self._closed

    def _worker(self) -> _DaemonWorker:
        if self._executor is None:
            self._executor = _DaemonWorker()
        return self._executor


class _DaemonWorker(Executor):
    """One daemon thread with a large stack, as an Executor. Not a ThreadPoolExecutor: the
    interpreter joins those at exit, so a server stopped right after it started would wait
    for the grammar warm-up (seconds for a large vocabulary); a daemon thread is dropped."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Future, Callable, tuple, dict] | None] = (
            queue.SimpleQueue())
        self._shut_down = False
        # `threading.stack_size` applies to threads created while it is set.
        previous = threading.stack_size(_WORKER_STACK_BYTES)
        try:
            threading.Thread(target=self._run, name="grammar-compile", daemon=True).start()
        finally:
            threading.stack_size(previous)

    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:
        if self._shut_down:
            raise RuntimeError("the grammar compiler is closed")
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
