"""Compiles request constraints into per-choice Grammars, off the step thread, with a bounded
LRU of compiled grammars. The engine core owns the one compiler of a served model (and with
it the backend's token table): engine.core.intake feeds it, the offline LLM calls it.

The cache key is (backend, kind, text, whitespace pattern); the tokenizer is fixed per
compiler, so it is part of the key implicitly.

Compilation runs on this compiler's own worker thread (engine.structured.worker, a large
stack), never on the step thread, so requests already running keep decoding while a large
grammar compiles.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from engine.errors import EngineError, UnsupportedError
from engine.structured.constraint import OutputConstraint

from engine.structured.grammar import CompiledGrammar, Grammar, GrammarBackend, TokenizerInfo
from engine.structured.reasoning_gate import GateBackend, GatedGrammar
from engine.structured.registry import DEFAULT_BACKEND, check_backend, create_backend
from engine.structured.worker import BigStackWorker

DEFAULT_CACHE_SIZE = 256

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
        self._gate_backends: dict[str, GateBackend] = {}
        self._blank_ids: dict[int, bool] = {}
        self._cache: OrderedDict[_CacheKey, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._executor: BigStackWorker | None = None
        self._closed = False
        self.num_cache_hits = 0
        self.num_cache_misses = 0

    def submit(self, job: Callable[[], None]) -> Future:
        """Run `job` (which compiles) on the worker thread (the core's request intake)."""
        return self._worker().submit(job)

    # ----- any thread but the step thread ---------------------------------------------------

    def new_grammars(
        self, constraint: OutputConstraint, n: int, prompt_token_ids: Sequence[int] = ()
    ) -> list[Grammar]:
        """`n` fresh matchers; gated behind the reasoning (reasoning_gate) when the constraint
        carries a ReasoningGate, starting in the state the prompt's end puts them in."""
        compiled = self.compile(constraint)
        grammars = [compiled.new_grammar() for _ in range(n)]
        gate = constraint.reasoning
        if gate is None:
            return grammars
        state = gate.initial_state(prompt_token_ids, self._is_blank)
        backend_name = constraint.backend or self.default_backend
        with self._lock:
            gate_backend = self._gate_backends.get(backend_name)
            if gate_backend is None:
                gate_backend = self._gate_backends[backend_name] = GateBackend(
                    grammars[0].backend if grammars else self.backend(backend_name))
        return [GatedGrammar(grammar, gate, state, gate_backend) for grammar in grammars]

    def _is_blank(self, token_id: int) -> bool:
        blank = self._blank_ids.get(token_id)
        if blank is None:
            blank = self._blank_ids[token_id] = not self.info.hf_tokenizer.decode([token_id]).strip()
        return blank

    def compile(self, constraint: OutputConstraint) -> CompiledGrammar:
        """Raises InvalidRequestError (naming the constraint's field) for a constraint the
        backend rejects. Its shape (one kind, options given) was validated where it entered
        the engine (gRPC conversion, or the offline LLM), not again here."""
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

    def _worker(self) -> BigStackWorker:
        if self._executor is None:
            self._executor = BigStackWorker("grammar-compile")
        return self._executor
