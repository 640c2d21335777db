"""The bridge's Prometheus metrics: request latencies as its clients see them (recorded from
each Generate stream, once per event), plus the engine's queue and KV gauges and prefix-cache
counters fetched with Discovery.GetLoad at scrape time (with --metrics-compat also
lora_requests_info's adapter labels, as the reference serves them on its API port), and
cache_config_info from the model's
Discovery entry. Served at GET /metrics (routes/metrics.py): where a router written for vLLM
(the Gateway API Inference Extension's endpoint picker) scrapes the serving port."""
from __future__ import annotations

import asyncio
import threading
import time

import grpc

from protoserve.serving_metrics import (
    InterTokenTimer,
    LoadSnapshot,
    RequestRecord,
    ServingMetrics,
)
from protoserve.vllm_compat import cache_config_labels
from protoserve.v1 import discovery_pb2, inference_pb2

_PB_REASONS = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_ABORT: "abort",
    inference_pb2.FINISH_REASON_CANCELLED: "cancelled",
    inference_pb2.FINISH_REASON_CONSTRAINT: "stop",
    inference_pb2.FINISH_REASON_DEADLINE: "deadline",
}
_CODE_OUTCOMES = {
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
    grpc.StatusCode.CANCELLED: "cancelled",
}


class BridgeMetrics:
    def __init__(self, *, compat: bool = False) -> None:
        self._load: LoadSnapshot | None = None
        self._cache_config: dict[str, str] | None = None
        self.model_name = ""
        self.metrics = ServingMetrics(
            lambda: self.model_name, load=lambda: self._load, extra_gauges=self._process_gauges,
            cache_config=lambda: self._cache_config,
            compat_prefixes=("vllm",) if compat else (),
        )

    def describe_model(self, info: discovery_pb2.ModelInfo) -> None:
        """The served model's name label and the cache settings Discovery reports; the
        engine's others (memory share, prefix caching) are not visible here, so ""."""
        self.model_name = info.id
        self._cache_config = cache_config_labels(block_size=info.block_size,
                                                 num_gpu_blocks=info.num_kv_blocks)

    def tracker(self, request: inference_pb2.GenerateRequest) -> GenerateTracker:
        return GenerateTracker(self.metrics, request)

    def render(self, load: discovery_pb2.GetLoadResponse | None) -> bytes:
        """Render with the engine gauges of `load` (omitted when the engine did not answer)."""
        self._load = None if load is None else LoadSnapshot(
            num_requests_running=load.num_requests_running,
            num_requests_waiting=load.num_requests_waiting,
            kv_cache_usage=load.kv_cache_usage,
            prefix_cache_hit_rate=load.prefix_cache_hit_rate,
            num_preemptions=load.num_preemptions,
            num_queried_tokens=load.num_prefix_cache_queried_tokens,
            num_hit_tokens=load.num_prefix_cache_hit_tokens,
            running_lora_adapters=tuple(load.running_lora_adapters),
            waiting_lora_adapters=tuple(load.waiting_lora_adapters),
            max_lora=load.max_lora,
        )
        return self.metrics.render()

    @staticmethod
    def _process_gauges() -> dict[str, float]:
        # Leak checks: the count of asyncio tasks and threads must return to its idle level.
        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:  # rendered outside the event loop
            tasks = 0
        return {"bridge_asyncio_tasks": float(tasks),
                "bridge_threads": float(threading.active_count())}


class GenerateTracker:
    """One Generate call's contribution: TTFT at the first delta, the gaps between tokens,
    tokens and finish reasons, and the request's n, best_of and max_tokens (max_tokens only
    when the request sets it: the bridge does not see the engine's default). The
    queue/prefill/decode split is the engine's."""

    __slots__ = ("_metrics", "_start", "_first", "_prompt", "_output", "_longest", "_reasons",
                 "_started", "_n", "_best_of", "_max_tokens", "_itl")

    def __init__(self, metrics: ServingMetrics, request: inference_pb2.GenerateRequest) -> None:
        self._metrics = metrics
        sampling = request.sampling
        self._n = sampling.n if sampling.HasField("n") else 1
        self._best_of = sampling.best_of if sampling.HasField("best_of") else None
        self._max_tokens = sampling.max_tokens if sampling.HasField("max_tokens") else None
        self._start = time.monotonic()
        self._first: float | None = None
        self._prompt = 0
        self._output = 0
        self._longest: int | None = None
        self._reasons: list[str] = []
        self._started = False
        self._itl = InterTokenTimer(metrics)

    def on_response(self, response: inference_pb2.GenerateResponse) -> None:
        kind = response.WhichOneof("event")
        if kind == "delta":
            tokens = len(response.delta.token_ids)
            if tokens:
                now = time.monotonic()
                if self._first is None:
                    self._first = now
                self._itl.on_tokens(response.delta.index, tokens, now)
        elif kind == "started":
            self._started = True
            self._prompt = response.started.prompt_tokens
        elif kind == "finished":
            self._output += response.finished.completion_tokens
            self._longest = max(self._longest or 0, response.finished.completion_tokens)
            self._reasons.append(_PB_REASONS.get(response.finished.reason, "stop"))

    def fail(self, error: BaseException) -> str:
        if isinstance(error, grpc.aio.AioRpcError):
            code = error.code()
            if code in _CODE_OUTCOMES:
                return _CODE_OUTCOMES[code]
            return "error" if self._started else "rejected"
        # The HTTP client went away (task cancelled or the stream closed early): a cancel,
        # unless every choice had already finished.
        return "" if self._reasons else "cancelled"

    def finish(self, outcome: str | None) -> None:
        reason = outcome or (self._reasons[0] if self._reasons else "error")
        if reason == "rejected":
            return  # never admitted: no latency sample
        now = time.monotonic()
        ttft = self._first - self._start if self._first is not None else None
        self._metrics.record(RequestRecord(reason, self._prompt, self._output, now - self._start,
                                           ttft, n=self._n, max_tokens=self._max_tokens,
                                           best_of=self._best_of,
                                           max_generation_tokens=self._longest))
