"""Per-request bookkeeping of the Generate servicer: one metrics record and one structured log
line per request, built from the events the request streams (asyncio side, once per event;
nothing on the step thread)."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from engine.errors import DeadlineExceededError, EngineError, QueueFullError, SlowConsumerError
from engine.generation import GenerationDelta, GenerationEvent, GenerationFinished, GenerationStarted
from engine.request import FinishReason
from protoserve.serving_metrics import LoadSnapshot, RequestRecord, ServingMetrics

logger = logging.getLogger("engine.requests")


@dataclass(frozen=True, slots=True)
class ServingOptions:
    """Serving policies fixed at start-up (engine-serve flags)."""

    # Requests waiting for admission beyond which new ones get RESOURCE_EXHAUSTED; None = no cap.
    max_queue_len: int | None = None
    # A streaming client that reads nothing for this long is cancelled (its buffer is bounded).
    stall_timeout_s: float = 30.0
    log_requests: bool = True
    # Characters of the prompt a request log line may carry; 0 never logs prompts.
    max_log_len: int = 0


def load_snapshot(engine) -> LoadSnapshot:
    """Scheduler and KV numbers read at scrape time; plain int/float reads of state the step
    thread owns, so a scrape never waits for a step."""
    scheduler = engine.core.scheduler
    kv = engine.core.kv_cache
    queried = kv.num_queried_tokens
    return LoadSnapshot(
        num_requests_running=scheduler.num_running,
        num_requests_waiting=scheduler.num_waiting,
        kv_cache_usage=kv.usage,
        prefix_cache_hit_rate=(kv.num_hit_tokens / queried) if queried else 0.0,
        num_preemptions=scheduler.num_preemptions,
    )


def outcome_of(error: BaseException, deadline_passed: bool) -> str:
    """The finished_reason label of a request that ended with an exception."""
    if isinstance(error, asyncio.CancelledError):
        return FinishReason.DEADLINE.value if deadline_passed else FinishReason.CANCELLED.value
    if isinstance(error, DeadlineExceededError):
        return FinishReason.DEADLINE.value
    if isinstance(error, SlowConsumerError):
        return FinishReason.CANCELLED.value  # the client stopped reading: it went away
    if isinstance(error, QueueFullError):
        return "rejected"
    if isinstance(error, EngineError) and error.kind.value == "invalid_argument":
        return "rejected"
    return "error"


class RequestTracker:
    def __init__(
        self, request_id: str, metrics: ServingMetrics | None, options: ServingOptions,
        prompt_preview: str = "",
    ) -> None:
        self.request_id = request_id
        self._metrics = metrics
        self._options = options
        self._prompt_preview = prompt_preview
        self._start = time.monotonic()
        self._first_token_at: float | None = None
        self._num_prompt = 0
        self._num_cached = 0
        self._num_output = 0
        self._reasons: list[str] = []
        self._done = False

    def on_event(self, event: GenerationEvent) -> None:
        if isinstance(event, GenerationDelta):
            if self._first_token_at is None and event.token_ids:
                self._first_token_at = time.monotonic()
        elif isinstance(event, GenerationStarted):
            self._num_prompt = len(event.prompt_token_ids)
            self._num_cached = event.num_cached_tokens
        elif isinstance(event, GenerationFinished):
            self._num_output += event.num_output_tokens
            self._reasons.append(event.reason.value)

    def finish(self, outcome: str | None = None) -> None:
        """Record once. `outcome` overrides the streamed finish reasons (errors, cancels)."""
        if self._done:
            return
        self._done = True
        reason = outcome or (self._reasons[0] if self._reasons else "error")
        if reason == "rejected":
            # Never admitted: not a served request (no latency sample, no token counts).
            self._log(reason, 0.0, None)
            return
        now = time.monotonic()
        e2e = now - self._start
        ttft = self._first_token_at - self._start if self._first_token_at is not None else None
        if self._metrics is not None:
            self._metrics.record(RequestRecord(reason, self._num_prompt, self._num_output, e2e,
                                               ttft))
        self._log(reason, e2e, ttft)

    def _log(self, reason: str, e2e: float, ttft: float | None) -> None:
        if not self._options.log_requests:
            return
        line = {
            "request_id": self.request_id,
            "finish_reason": reason,
            "prompt_tokens": self._num_prompt,
            "cached_tokens": self._num_cached,
            "output_tokens": self._num_output,
            "ttft_s": round(ttft, 4) if ttft is not None else None,
            "e2e_s": round(e2e, 4),
        }
        if self._options.max_log_len > 0 and self._prompt_preview:
            line["prompt"] = self._prompt_preview[: self._options.max_log_len]
        logger.info("request %s", json.dumps(line, ensure_ascii=False))
