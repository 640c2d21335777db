"""Prometheus metrics shared by the engine and the bridge (both import `protoserve`, neither
imports the other).

Cost model: request-level numbers are recorded once per request from its stream events on the
asyncio side (a few dict updates), and the inter-token histogram once per delta event there
(a lock and a bisect); gauges (queue depth, KV use), the prefix-cache counters and the engine's
tokens-per-step histogram are read from a callback at scrape time. Nothing here runs on the
step thread.

Names follow vLLM's `/metrics` under our `protoserve:` prefix; `compat_prefixes=("vllm",)`
repeats every family under `vllm:` and adds the reference's families that only make sense for
compatibility (`vllm_compat.py`), for dashboards and routers built for vLLM.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from protoserve.histogram import Histogram, one_two_five
from protoserve.vllm_compat import ThroughputWindow, compat_families, reference_reasons

PREFIX = "protoserve"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets as vLLM uses them for the same histograms (seconds, or tokens).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
PHASE_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# The reference server stops at the model's context; ours is fixed, so it covers any context.
TOKEN_COUNT_BUCKETS = one_two_five(2_000_000)
PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)

ITL = "time_per_output_token_seconds"
# Per-request histograms every process records: (name, doc, buckets).
_REQUEST_HISTOGRAMS = (
    ("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS),
    # One observation per output token after a choice's first: the gap since the previous
    # token (observe_inter_token), as the reference records every inter-token latency.
    (ITL, "Time between consecutive output tokens of a choice.", TPOT_BUCKETS),
    # Once per request: (e2e - TTFT) / (generated tokens - 1), vLLM >= 0.11's per-request name.
    ("request_time_per_output_token_seconds", "Mean time per output token after the first, "
     "per request.", TPOT_BUCKETS),
    ("e2e_request_latency_seconds", "End-to-end request latency.", E2E_BUCKETS),
    ("request_prompt_tokens", "Prompt tokens per request.", TOKEN_COUNT_BUCKETS),
    ("request_generation_tokens", "Generated tokens per request.", TOKEN_COUNT_BUCKETS),
    ("request_max_num_generation_tokens", "Generated tokens of a request's longest choice.",
     TOKEN_COUNT_BUCKETS),
    ("request_params_n", "The n parameter of requests.", PARAMS_N_BUCKETS),
    # vLLM <= 0.6.3 exported this (best_of was deprecated at the reference commit); dashboards
    # of that era chart it, and best_of still works here.
    ("request_params_best_of", "The best_of parameter of requests (n when unset).",
     PARAMS_N_BUCKETS),
    ("request_params_max_tokens", "The max_tokens of requests (after resolution).",
     TOKEN_COUNT_BUCKETS),
)
# Only where the scheduler's timestamps are known (the engine): a request's latency split at
# its first scheduling and its first token. queue + inference = e2e; prefill + decode =
# inference.
_PHASE_HISTOGRAMS = (
    ("request_queue_time_seconds",
     "Arrival to first scheduled (tokenization and queueing).", PHASE_BUCKETS),
    ("request_prefill_time_seconds", "First scheduled to first token.", PHASE_BUCKETS),
    ("request_decode_time_seconds", "First token to finish.", PHASE_BUCKETS),
    ("request_inference_time_seconds", "First scheduled to finish.", PHASE_BUCKETS),
)
# Second names of a histogram, rendered from the same observations: vLLM >= 0.11 calls the
# inter-token histogram inter_token_latency_seconds, and v0.6.4's deprecated
# time_in_queue_requests is the queue time again (compat prefixes only).
_ALIASES = {ITL: "inter_token_latency_seconds"}
_COMPAT_ALIASES = {"request_queue_time_seconds": "time_in_queue_requests"}
_ABORT_REASONS = ("cancelled", "deadline", "abort", "error")


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    """Gauges and core counters read at scrape time."""

    num_requests_running: int
    num_requests_waiting: int
    kv_cache_usage: float
    prefix_cache_hit_rate: float
    num_preemptions: int
    # Prompt tokens looked up in the prefix cache since start, and those found cached.
    num_queried_tokens: int = 0
    num_hit_tokens: int = 0
    # Tokens computed per engine step (a snapshot); None where unknown (the bridge).
    iteration_tokens: Histogram | None = None
    # Speculative decoding counters; None where it is off or unknown (the bridge).
    spec_decode: SpecDecodeCounts | None = None
    # Adapters of running / waiting requests and --max-loras (0: LoRA off or unknown).
    running_lora_adapters: tuple[str, ...] = ()
    waiting_lora_adapters: tuple[str, ...] = ()
    max_lora: int = 0


def lora_labels(load: LoadSnapshot | None) -> tuple[str, str, str]:
    """lora_requests_info's running_lora_adapters, max_lora, waiting_lora_adapters: the names
    comma-joined, each once, as the reference joins its per-adapter counters' keys."""
    if load is None:
        return ("", "0", "")
    return (",".join(load.running_lora_adapters), str(load.max_lora),
            ",".join(load.waiting_lora_adapters))


@dataclass(frozen=True, slots=True)
class SpecDecodeCounts:
    """Cumulative speculative decoding counters, as the reference (vLLM V1) names them: a
    draft is one verification of one request's draft tokens."""

    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    # Index i: drafts whose token at position i was accepted.
    accepted_per_pos: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What one finished request contributes to the counters and histograms."""

    finished_reason: str  # stop | length | abort | cancelled | deadline | error | ...
    num_prompt_tokens: int
    num_generation_tokens: int
    e2e_s: float
    ttft_s: float | None = None
    # The request's n, best_of and resolved max_tokens (None: not known where recorded).
    n: int | None = None
    max_tokens: int | None = None
    best_of: int | None = None
    # Generated tokens of its longest choice (None: no choice finished).
    max_generation_tokens: int | None = None
    # Latency split (seconds), for requests the engine scheduled: arrival -> first scheduled,
    # first scheduled -> first token, first token -> finish, first scheduled -> finish.
    queue_s: float | None = None
    prefill_s: float | None = None
    decode_s: float | None = None
    inference_s: float | None = None


class InterTokenTimer:
    """One request's token gaps, per choice, as its events reach the server's stream: each
    gap after a choice's first token is one time_per_output_token observation. A choice's
    first event may carry several tokens (beam search sends a choice whole): the gaps between
    those are not known, so they are not observed."""

    __slots__ = ("_metrics", "_last")

    def __init__(self, metrics: ServingMetrics | None) -> None:
        self._metrics = metrics
        self._last: dict[int, float] = {}

    def on_tokens(self, index: int, count: int, now: float) -> None:
        if self._metrics is None or count <= 0:
            return
        last = self._last.get(index)
        self._last[index] = now
        if last is not None:
            self._metrics.observe_inter_token(now - last, count)


def _histogram(name: str, doc: str, labels: dict[str, str], hist: Histogram):
    cumulative, running = [], 0
    for bound, count in zip((*map(str, hist.buckets), "+Inf"), hist.counts, strict=True):
        running += count
        cumulative.append((bound, running))
    family = HistogramMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), cumulative, hist.total)
    return family


class ServingMetrics(Collector):
    """One instance per process. `record` and `observe_inter_token` are called from the event
    loop; `collect` from the scrape thread, so they take a small lock (held for
    microseconds)."""

    def __init__(
        self,
        model_name: str | Callable[[], str] = "",
        *,
        load: Callable[[], LoadSnapshot | None] | None = None,
        extra_gauges: Callable[[], dict[str, float]] | None = None,
        cache_config: Callable[[], dict[str, str] | None] | None = None,
        compat_prefixes: Sequence[str] = (),
        request_phases: bool = False,
    ) -> None:
        """`cache_config`: cache_config_info's labels (vllm_compat.cache_config_labels), None
        while unknown. `request_phases`: export the queue/prefill/decode/inference histograms
        (the engine, which knows when each request was first scheduled)."""
        self.model_name = model_name
        self._load = load
        self._extra_gauges = extra_gauges
        self._cache_config = cache_config
        self._prefixes = (PREFIX, *compat_prefixes)
        self._lock = threading.Lock()
        # A finish reason's series appears once a request ends that way, as the reference's
        # labelled counter does (no zero series for reasons that never happened).
        self._success: dict[str, int] = {}
        self._prompt_tokens = 0
        self._generation_tokens = 0
        specs = _REQUEST_HISTOGRAMS + (_PHASE_HISTOGRAMS if request_phases else ())
        self._hists = {name: (doc, Histogram(buckets)) for name, doc, buckets in specs}
        self._itl = self._hists[ITL][1]
        self._throughput = ThroughputWindow() if compat_prefixes else None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def record(self, rec: RequestRecord) -> None:
        values: dict[str, float | None] = {
            "e2e_request_latency_seconds": rec.e2e_s,
            "time_to_first_token_seconds": rec.ttft_s,
            "request_prompt_tokens": rec.num_prompt_tokens,
            "request_generation_tokens": rec.num_generation_tokens,
            "request_max_num_generation_tokens": rec.max_generation_tokens,
            "request_params_n": rec.n,
            "request_params_best_of": rec.best_of if rec.best_of is not None else rec.n,
            "request_params_max_tokens": rec.max_tokens,
            "request_queue_time_seconds": rec.queue_s,
            "request_prefill_time_seconds": rec.prefill_s,
            "request_decode_time_seconds": rec.decode_s,
            "request_inference_time_seconds": rec.inference_s,
        }
        if rec.ttft_s is not None and rec.num_generation_tokens > 1:
            decode_s = max(rec.e2e_s - rec.ttft_s, 0.0)
            values["request_time_per_output_token_seconds"] = (
                decode_s / (rec.num_generation_tokens - 1))
        with self._lock:
            self._success[rec.finished_reason] = self._success.get(rec.finished_reason, 0) + 1
            self._prompt_tokens += rec.num_prompt_tokens
            self._generation_tokens += rec.num_generation_tokens
            for name, value in values.items():
                entry = self._hists.get(name)
                if entry is not None and value is not None:
                    entry[1].observe(value)

    def observe_inter_token(self, interval_s: float, count: int = 1) -> None:
        """`count` tokens that arrived together `interval_s` after the previous ones: `count`
        gaps of interval_s / count (the stream does not say when each was computed)."""
        with self._lock:
            self._itl.observe(max(interval_s, 0.0) / count, count)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ----- prometheus_client.Collector ---------------------------------------------------

    def collect(self) -> Iterator:
        load = self._load() if self._load is not None else None
        extra = self._extra_gauges() if self._extra_gauges is not None else {}
        cache = self._cache_config() if self._cache_config is not None else None
        with self._lock:
            success = dict(self._success)
            prompt, generation = self._prompt_tokens, self._generation_tokens
            hists = [(name, doc, h.snapshot()) for name, (doc, h) in self._hists.items()]
        if load is not None and load.iteration_tokens is not None:
            hists.append(("iteration_tokens_total", "Tokens computed per engine step.",
                          load.iteration_tokens))
        throughput = (self._throughput.rates(prompt, generation)
                      if self._throughput is not None else (0.0, 0.0))
        name = self.model_name() if callable(self.model_name) else self.model_name
        labels = {"model_name": name}
        for prefix in self._prefixes:
            compat = prefix != PREFIX
            yield from self._families(prefix, compat, labels, load, extra, cache, success,
                                      prompt, generation, hists)
            if compat:
                yield from compat_families(
                    prefix, labels, load_known=load is not None, throughput=throughput,
                    spec_decode_known=load is not None and load.spec_decode is not None,
                    lora_labels=lora_labels(load))

    def _families(self, p, compat, labels, load, extra, cache, success, prompt, generation,
                  hists) -> Iterator:
        names = list(labels)
        values = list(labels.values())

        def gauge(name: str, doc: str, value: float):
            family = GaugeMetricFamily(f"{p}:{name}", doc, labels=names)
            family.add_metric(values, value)
            return family

        def counter(name: str, doc: str, value: float):
            family = CounterMetricFamily(f"{p}:{name}", doc, labels=names)
            family.add_metric(values, value)
            return family

        if load is not None:
            yield gauge("num_requests_running", "Requests in the model batch.",
                        load.num_requests_running)
            yield gauge("num_requests_waiting", "Requests waiting to be scheduled.",
                        load.num_requests_waiting)
            # gpu_cache_usage_perc: the reference's name; kv_cache_usage_perc: vLLM V1's.
            yield gauge("gpu_cache_usage_perc", "KV cache usage, 0..1 (1 = full).",
                        load.kv_cache_usage)
            yield gauge("kv_cache_usage_perc", "KV cache usage, 0..1 (1 = full).",
                        load.kv_cache_usage)
            yield gauge("gpu_prefix_cache_hit_rate", "Prefix cache hit rate, 0..1.",
                        load.prefix_cache_hit_rate)
            yield counter("num_preemptions", "Preempted (recomputed) requests.",
                          load.num_preemptions)
            # vLLM V1's counters behind the hit rate, in tokens: rate(hits) / rate(queries)
            # is the hit rate over any window.
            yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                          load.num_queried_tokens)
            yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                          load.num_hit_tokens)
            if load.spec_decode is not None:
                yield from _spec_decode_families(p, labels, load.spec_decode)
        for name, value in extra.items():
            yield gauge(name, name.replace("_", " "), value)
        if cache is not None:
            info = GaugeMetricFamily(f"{p}:cache_config_info", "The KV cache configuration.",
                                     labels=list(cache))
            info.add_metric(list(cache.values()), 1.0)
            yield info
        yield counter("prompt_tokens", "Prefill tokens processed.", prompt)
        yield counter("generation_tokens", "Generation tokens processed.", generation)
        yield counter("tokens", "Prompt plus generation tokens.", prompt + generation)
        done = CounterMetricFamily(f"{p}:request_success", "Finished requests by reason.",
                                   labels=[*names, "finished_reason"])
        for reason, count in (reference_reasons(success) if compat else success).items():
            done.add_metric([*values, reason], count)
        yield done
        aborted = CounterMetricFamily(
            f"{p}:request_aborted", "Requests ended before completion, by reason: cancelled "
            "(the client went away), deadline (it expired), abort (the server aborted it).",
            labels=[*names, "reason"])
        for reason in _ABORT_REASONS:
            if reason in success:
                aborted.add_metric([*values, reason], success[reason])
        yield aborted
        for name, doc, hist in hists:
            yield _histogram(f"{p}:{name}", doc, labels, hist)
            alias = _ALIASES.get(name) or (_COMPAT_ALIASES.get(name) if compat else None)
            if alias is not None:
                yield _histogram(f"{p}:{alias}", doc, labels, hist)


def _spec_decode_families(p: str, labels: dict[str, str], spec: SpecDecodeCounts) -> Iterator:
    """vLLM V1's spec_decode counters, plus the acceptance rate (the reference's V0 gauge
    name) and the mean accepted length: tokens emitted per verification, the target's own
    token included."""
    names, values = list(labels), list(labels.values())
    for name, doc, value in (
        ("spec_decode_num_drafts", "Verifications of draft tokens (one per request).",
         spec.num_drafts),
        ("spec_decode_num_draft_tokens", "Draft tokens proposed.", spec.num_draft_tokens),
        ("spec_decode_num_accepted_tokens", "Draft tokens accepted.", spec.num_accepted_tokens),
        # The reference's V0 counter: accepted drafts plus the target's own token.
        ("spec_decode_num_emitted_tokens", "Tokens emitted by verifications.",
         spec.num_accepted_tokens + spec.num_drafts),
    ):
        family = CounterMetricFamily(f"{p}:{name}", doc, labels=names)
        family.add_metric(values, value)
        yield family
    per_pos = CounterMetricFamily(
        f"{p}:spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted, by position.",
        labels=[*names, "position"])
    for position, value in enumerate(spec.accepted_per_pos):
        per_pos.add_metric([*values, str(position)], value)
    yield per_pos
    rate = spec.num_accepted_tokens / spec.num_draft_tokens if spec.num_draft_tokens else 0.0
    mean = 1 + spec.num_accepted_tokens / spec.num_drafts if spec.num_drafts else 0.0
    # Emitted / the most the proposals could have emitted (every draft accepted, plus one).
    most = spec.num_draft_tokens + spec.num_drafts
    efficiency = (spec.num_accepted_tokens + spec.num_drafts) / most if most else 0.0
    for name, doc, value in (
        ("spec_decode_draft_acceptance_rate", "Accepted / proposed draft tokens, 0..1.", rate),
        ("spec_decode_mean_accepted_length", "Tokens emitted per verification (accepted "
         "drafts + 1).", mean),
        ("spec_decode_efficiency", "Emitted tokens / the most the drafts could emit, 0..1.",
         efficiency),
    ):
        family = GaugeMetricFamily(f"{p}:{name}", doc, labels=names)
        family.add_metric(values, value)
        yield family
