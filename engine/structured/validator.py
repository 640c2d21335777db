"""The serving side's check of an output constraint before its request queues.

A bad JSON schema, regex or grammar must fail with INVALID_ARGUMENT naming its field before
the request queues, yet the backend's token table and every matcher belong to the engine core
(engine/core/intake.py compiles them there). Both backends can check a grammar without a
tokenizer (llguidance's `validate_grammar`, xgrammar's `Grammar.from_*`): that check runs
here, and nothing that needs the tokenizer. It runs on a large-stack worker thread
(engine.structured.worker): the check recurses over the grammar as compiling does, and a
large grammar takes about a second, which the event loop must not wait for (llguidance
releases the GIL meanwhile). Constraints that passed are remembered (a bounded LRU keyed
like the compiler's cache), so a repeated one costs a lookup.

What only the tokenizer can tell (a grammar whose first token no token can start) fails in
the core's compile instead: the request's one output then carries the error, and the serving
side raises it before the stream starts (engine/frontend/request_stream.py).
"""
from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict

from engine.structured.constraint import OutputConstraint
from engine.structured.registry import DEFAULT_BACKEND, check_backend, validate_with_backend
from engine.structured.worker import BigStackWorker

DEFAULT_CACHE_SIZE = 256

_Key = tuple[str, str, str, str | None]


class ConstraintValidator:
    def __init__(
        self, default_backend: str = DEFAULT_BACKEND, *, cache_size: int = DEFAULT_CACHE_SIZE
    ) -> None:
        check_backend(default_backend, field="guided_decoding_backend")
        self.default_backend = default_backend
        self.cache_size = cache_size
        self._passed: OrderedDict[_Key, None] = OrderedDict()
        self._lock = threading.Lock()
        self._executor: BigStackWorker | None = None

    async def check(self, constraint: OutputConstraint) -> None:
        """Raise InvalidRequestError naming the constraint's field (or its backend) for one
        the backend rejects. The constraint's shape was validated where it entered."""
        if self._seen(self._key(constraint)):
            return
        if self._executor is None:
            self._executor = BigStackWorker("grammar-validate")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.check_now, constraint)

    def check_now(self, constraint: OutputConstraint) -> None:
        """`check` on the calling thread (not the event loop's: see the module docstring)."""
        key = self._key(constraint)
        validate_with_backend(key[0], constraint)
        with self._lock:
            self._passed[key] = None
            self._passed.move_to_end(key)
            while len(self._passed) > self.cache_size:
                self._passed.popitem(last=False)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _key(self, constraint: OutputConstraint) -> _Key:
        backend = constraint.backend or self.default_backend
        return (backend, constraint.kind.value, constraint.spec, constraint.whitespace_pattern)

    def _seen(self, key: _Key) -> bool:
        with self._lock:
            if key not in self._passed:
                return False
            self._passed.move_to_end(key)
            return True
