"""Per-request bookkeeping of the Generate servicer: one metrics record, one structured log
line and (with tracing) one span per request, built from the events the request streams
(asyncio side, once per event; nothing on the step thread).

Timestamps, all time.monotonic(): arrival (the servicer starts), first scheduled (carried by
GenerationStarted from the scheduler), first token (the first delta with tokens), finish (the
last choice's Finished event). They split e2e into queue + prefill + decode."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from engine.errors import DeadlineExceededError, EngineError, QueueFullError, SlowConsumerError
from engine.generation import GenerationDelta, GenerationEvent, GenerationFinished, GenerationStarted
from engine.core.request import FinishReason
from engine.server.admission import DEFAULT_MAX_REQUEST_MEMORY
from protoserve.serving_metrics import (
    InterTokenTimer,
    LoadSnapshot,
    RequestRecord,
    SpecDecodeCounts,
    ServingMetrics,
)
from engine.frontend.kv_event_hub import DEFAULT_MAX_PENDING_BATCHES, DEFAULT_REPLAY_BATCHES
from protoserve.tracing import end_span

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
    # Most choices (n, best_of, beam width) one request may ask for: each costs memory in both
    # processes before anything runs, so one request must not be able to exhaust it.
    max_n: int = 128
    # Largest prompt (text, token ids or chat input, in bytes of the request) accepted before
    # tokenizing; None: PROMPT_BYTES_PER_TOKEN x the model's context length.
    max_prompt_bytes: int | None = None
    # Host-memory budget of all requests in flight together (engine.server.admission): a
    # request over it alone is INVALID_ARGUMENT, one that does not fit now RESOURCE_EXHAUSTED.
    max_request_memory: int = DEFAULT_MAX_REQUEST_MEMORY
    # Parsers chat requests get when they name none (engine.server.parsed_output): the
    # --reasoning-parser, and the --tool-call-parser when --enable-auto-tool-choice is on.
    reasoning_parser: str = ""
    auto_tool_parser: str = ""
    # KV-event batches a WatchKvEvents stream may fall behind before it is ended.
    kv_events_max_pending: int = DEFAULT_MAX_PENDING_BATCHES
    # Batches kept for streams reopened with since_sequence_number.
    kv_events_replay_batches: int = DEFAULT_REPLAY_BATCHES


# No real tokenizer gets near this many bytes per token, so a prompt over the derived bound
# could never fit the context: refused before tokenization costs seconds.
PROMPT_BYTES_PER_TOKEN = 32


def load_snapshot(engine) -> LoadSnapshot:
    """Scheduler and KV numbers at scrape time, as the engine core last reported them (plain
    reads of its state on a step thread; at most one step old from a core process)."""
    stats = engine.loop.stats()
    queried = stats.num_queried_tokens
    return LoadSnapshot(
        num_requests_running=stats.num_requests_running,
        num_requests_waiting=stats.num_requests_waiting,
        kv_cache_usage=stats.kv_cache_usage,
        prefix_cache_hit_rate=(stats.num_hit_tokens / queried) if queried else 0.0,
        num_preemptions=stats.num_preemptions,
        num_queried_tokens=queried,
        num_hit_tokens=stats.num_hit_tokens,
        iteration_tokens=stats.iteration_tokens,
        spec_decode=None if (spec := stats.spec_decode) is None else SpecDecodeCounts(
            spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens,
            tuple(spec.accepted_per_pos),
        ),
        running_lora_adapters=stats.running_lora_adapters,
        waiting_lora_adapters=stats.waiting_lora_adapters,
        max_lora=stats.max_lora,
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
        prompt_preview: str = "", *, n: int | None = None, best_of: int | None = None,
        trace_id: str | None = None, span: Any | None = None,
    ) -> None:
        self.request_id = request_id
        self._metrics = metrics
        self._options = options
        self._prompt_preview = prompt_preview
        self._n = n
        self._best_of = best_of
        self._trace_id = trace_id
        self._span = span  # an OpenTelemetry span, ended by finish()
        self._start = time.monotonic()
        self._scheduled_at: float | None = None
        self._first_token_at: float | None = None
        self._finished_at: float | None = None
        self._max_tokens: int | None = None
        self._num_prompt = 0
        self._num_cached = 0
        self._num_output = 0
        self._longest_choice: int | None = None
        self._itl = InterTokenTimer(metrics)
        self._reasons: list[str] = []
        self._done = False

    def on_event(self, event: GenerationEvent) -> None:
        if isinstance(event, GenerationDelta):
            if event.token_ids:
                now = time.monotonic()
                if self._first_token_at is None:
                    self._first_token_at = now
                self._itl.on_tokens(event.index, len(event.token_ids), now)
        elif isinstance(event, GenerationStarted):
            self._num_prompt = len(event.prompt_token_ids)
            self._num_cached = event.num_cached_tokens
            self._scheduled_at = event.scheduled_at
            self._max_tokens = event.max_tokens
        elif isinstance(event, GenerationFinished):
            self._num_output += event.num_output_tokens
            self._longest_choice = max(self._longest_choice or 0, event.num_output_tokens)
            self._reasons.append(event.reason.value)
            self._finished_at = time.monotonic()

    def finish(self, outcome: str | None = None) -> None:
        """Record once. `outcome` overrides the streamed finish reasons (errors, cancels)."""
        if self._done:
            return
        self._done = True
        reason = outcome or (self._reasons[0] if self._reasons else "error")
        if reason == "rejected":
            # Never admitted: not a served request (no latency sample, no token counts).
            self._log(reason, 0.0, None, None)
            self._end_span(reason, 0.0, None, None)
            return
        now = time.monotonic()
        e2e = now - self._start
        first = self._first_token_at
        ttft = first - self._start if first is not None else None
        record = RequestRecord(reason, self._num_prompt, self._num_output, e2e, ttft,
                               n=self._n, max_tokens=self._max_tokens, best_of=self._best_of,
                               max_generation_tokens=self._longest_choice)
        scheduled = self._scheduled_at
        if scheduled is not None:
            # An error or cancel ends the request now; a normal finish at its last Finished
            # event (the final writes to the client are not the engine's time).
            end = self._finished_at if outcome is None and self._finished_at else now
            record = replace(
                record,
                queue_s=max(scheduled - self._start, 0.0),
                inference_s=max(end - scheduled, 0.0),
                prefill_s=max(first - scheduled, 0.0) if first is not None else None,
                decode_s=max(end - first, 0.0) if first is not None else None,
            )
        if self._metrics is not None:
            self._metrics.record(record)
        self._log(reason, e2e, ttft, record.queue_s)
        self._end_span(reason, e2e, ttft, record.queue_s)

    def _log(self, reason: str, e2e: float, ttft: float | None, queue: float | None) -> None:
        if not self._options.log_requests:
            return
        line = {
            "request_id": self.request_id,
            "finish_reason": reason,
            "prompt_tokens": self._num_prompt,
            "cached_tokens": self._num_cached,
            "output_tokens": self._num_output,
            "queue_s": _rounded(queue),
            "ttft_s": _rounded(ttft),
            "e2e_s": round(e2e, 4),
        }
        if self._trace_id is not None:
            line["trace_id"] = self._trace_id
        if self._options.max_log_len > 0 and self._prompt_preview:
            line["prompt"] = self._prompt_preview[: self._options.max_log_len]
        logger.info("request %s", json.dumps(line, ensure_ascii=False))

    def _end_span(self, reason: str, e2e: float, ttft: float | None,
                  queue: float | None) -> None:
        if self._span is None:
            return
        # The reference server's attribute names (gen_ai.*), so its trace views apply.
        end_span(self._span, {
            "gen_ai.request.id": self.request_id,
            "gen_ai.request.n": self._n,
            "gen_ai.request.max_tokens": self._max_tokens,
            "gen_ai.usage.prompt_tokens": self._num_prompt,
            "gen_ai.usage.completion_tokens": self._num_output,
            "gen_ai.response.finish_reasons": [reason],
            "gen_ai.latency.time_in_queue": queue,
            "gen_ai.latency.time_to_first_token": ttft,
            "gen_ai.latency.e2e": e2e,
        }, error=reason if reason in ("error", "rejected") else None)


def _rounded(seconds: float | None) -> float | None:
    return round(seconds, 4) if seconds is not None else None
