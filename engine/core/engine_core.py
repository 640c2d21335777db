"""The synchronous heart of the engine: one step = schedule -> execute -> update.

Everything here runs on the step thread; the engine loop is the only caller.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

from engine.core.batch import ScheduledBatch
from engine.core.core_request import CoreRequest
from engine.config import EngineConfig
from engine.kv_cache import KVCacheManager
from engine.core.outputs import ModelRunnerOutput, RequestOutput
from engine.core.request import FinishReason, Request
from engine.errors import EngineError, InvalidRequestError
from engine.scheduler import Scheduler
from engine.spec_decode.proposals import SpecDecoder
from protoserve.histogram import Histogram

if TYPE_CHECKING:
    from engine.structured.grammar import Grammar

# The reference server's buckets for tokens computed per step.
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class Runner(Protocol):
    num_blocks: int
    # The window of each KV cache group (None: full attention; engine/kv_cache/groups.py).
    kv_group_windows: tuple[int | None, ...]

    def execute(self, batch: ScheduledBatch) -> ModelRunnerOutput: ...


class EngineCore:
    def __init__(self, config: EngineConfig, runner: Runner, max_model_len: int) -> None:
        self.config = config
        self.runner = runner
        self.kv_cache = KVCacheManager(
            runner.num_blocks,
            config.cache.block_size,
            enable_prefix_caching=config.cache.enable_prefix_caching,
            group_windows=runner.kv_group_windows,
        )
        spec = (
            SpecDecoder(config.speculative, max_model_len, target=runner)
            if config.speculative is not None else None
        )
        self.scheduler = Scheduler(
            config.scheduler, self.kv_cache, max_model_len, spec,
            max_loras=config.lora.max_loras if config.lora is not None else None,
        )
        # Cumulative counters (metrics, and tests that check work skipped by the prefix cache).
        self.num_steps = 0
        self.num_computed_tokens_total = 0
        # Tokens per step, one observation per step (never per token); the metrics scrape
        # reads a snapshot from another thread.
        self.iteration_tokens = Histogram(ITERATION_TOKENS_BUCKETS)

    def add_request(self, request: CoreRequest, grammar: Grammar | None = None) -> None:
        """The core's own Request for `request`, queued. `grammar`: its matcher, built by
        the core's grammar compiler (off the step thread) when it has a constraint."""
        if request.lora is not None and (error := self._load_adapter(request)) is not None:
            self.scheduler.refuse(RequestOutput(
                request.request_id, [], FinishReason.ABORT,
                num_prompt_tokens=request.num_prompt_tokens, finish_message=error.message,
                error=error))
            return
        self.scheduler.add_request(Request.from_core(request, grammar))

    def _load_adapter(self, request: CoreRequest) -> EngineError | None:
        """Its LoRA adapter read (or found cached) on arrival; the error that refuses it."""
        slots = getattr(self.runner, "lora", None)
        if slots is None:
            return InvalidRequestError("this engine serves no LoRA adapters", field="model")
        try:
            slots.preload(request.lora)
        except EngineError as error:  # LoRALoadError: the directory changed since it was checked
            return error
        return None

    def abort_requests(self, request_ids: list[str], reason: FinishReason) -> list[str]:
        return self.scheduler.abort_requests(request_ids, reason)

    @property
    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch.is_empty and not batch.finished_request_ids:
            return self.scheduler.take_pending_outputs()
        started = time.perf_counter()
        output = self.runner.execute(batch)
        if self.scheduler.spec is not None:  # its cost model prices draft rows from this
            self.scheduler.spec.cost.observe(batch.requests, time.perf_counter() - started)
        self.num_steps += 1
        self.num_computed_tokens_total += batch.num_scheduled_tokens
        if batch.num_scheduled_tokens:
            self.iteration_tokens.observe(batch.num_scheduled_tokens)
        return self.scheduler.update_from_output(batch, output)
