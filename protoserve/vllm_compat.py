"""What only the reference server's (vLLM's) /metrics has, exported under the compat prefix
(`--metrics-compat`) so that dashboards, autoscalers (KEDA, HPA adapters) and the Gateway API
Inference Extension's endpoint picker written for vLLM work unchanged: names for things this
engine has not got (swap space, a CPU cache, LoRA adapters, speculative decoding, per-step
model timings), deprecated aliases, and the mapping of our finish reasons onto vLLM's.

The reference is vLLM v0.6.4's `vllm/engine/metrics.py` (the notes' section 10); where those
notes are silent (label values, buckets, when a series appears) this follows vLLM's behaviour
as we know it, and the comments say so. Families under our own `protoserve:` prefix are built
in `serving_metrics.py`; everything here is compat-only.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

# vLLM's CacheConfig attributes, in its order: its `cache_config_info` is an info-style gauge
# (value 1) labelled with str() of every CacheConfig attribute (`metrics_info()` in v0.6.4),
# and no model_name label. The endpoint picker reads block_size and num_gpu_blocks from it.
CACHE_CONFIG_LABELS = (
    "block_size", "gpu_memory_utilization", "swap_space_bytes", "num_gpu_blocks_override",
    "cache_dtype", "is_attention_free", "sliding_window", "enable_prefix_caching",
    "cpu_offload_gb", "num_gpu_blocks", "num_cpu_blocks",
)
# What holds for every protoserve engine: no swap space or CPU offload (so no CPU blocks), the
# KV cache in the model's dtype (vLLM's "auto"), attention everywhere, and a context capped at
# a model's sliding window instead of a sliding-window cache (vLLM's str(None)).
_ENGINE_FACTS = {
    "swap_space_bytes": "0", "cache_dtype": "auto", "is_attention_free": "False",
    "sliding_window": "None", "cpu_offload_gb": "0", "num_cpu_blocks": "0",
}

# vLLM's finish reasons are stop, length and abort: a client that went away and an expired
# deadline are aborts there (vLLM aborts a request whose client disconnects). "error" stays
# (newer vLLM has it too); protoserve:request_success_total keeps our finer reasons.
_REFERENCE_REASONS = {"cancelled": "abort", "deadline": "abort"}


def cache_config_labels(**known: object) -> dict[str, str]:
    """`cache_config_info`'s labels in vLLM's order. `known` values are str()-ed as vLLM does
    (None -> "None"); a label the caller cannot know (the bridge, which sees only what
    Discovery reports) is "" rather than a guess."""
    stray = set(known) - set(CACHE_CONFIG_LABELS)
    if stray:
        raise ValueError(f"not a cache_config_info label: {sorted(stray)}")
    values = {**_ENGINE_FACTS, **{name: str(value) for name, value in known.items()}}
    return {name: values.get(name, "") for name in CACHE_CONFIG_LABELS}


def reference_reasons(success: dict[str, int]) -> dict[str, int]:
    """request_success_total's counts by vLLM's finished_reason values."""
    merged: dict[str, int] = {}
    for reason, count in success.items():
        key = _REFERENCE_REASONS.get(reason, reason)
        merged[key] = merged.get(key, 0) + count
    return merged


class ThroughputWindow:
    """The deprecated avg_{prompt,generation}_throughput_toks_per_s gauges: tokens per second
    over the last window of at least INTERVAL_S. vLLM rolls the window every 5 s on its step
    loop; here a scrape rolls it, so nothing runs per step (the first scrape after a long
    silence averages over the silence)."""

    INTERVAL_S = 5.0

    def __init__(self) -> None:
        self._lock = threading.Lock()  # scrapes run on several threads
        self._since = time.monotonic()
        self._counts = (0, 0)
        self._rates = (0.0, 0.0)

    def rates(self, prompt: int, generation: int) -> tuple[float, float]:
        now = time.monotonic()
        with self._lock:
            elapsed = now - self._since
            if elapsed >= self.INTERVAL_S:
                self._rates = ((prompt - self._counts[0]) / elapsed,
                               (generation - self._counts[1]) / elapsed)
                self._since, self._counts = now, (prompt, generation)
            return self._rates


def compat_families(prefix: str, labels: dict[str, str], *, load_known: bool,
                    throughput: tuple[float, float], spec_decode_known: bool = False,
                    lora_labels: tuple[str, str, str] = ("", "0", "")) -> Iterator:
    """The reference's families this engine has no counterpart for, at their idle values
    (the speculative decoding ones only while it is off: serving_metrics renders them), and
    lora_requests_info with `lora_labels` (running adapters, max_lora, waiting adapters)."""
    names, values = list(labels), list(labels.values())

    def gauge(name: str, doc: str, value: float):
        family = GaugeMetricFamily(f"{prefix}:{name}", doc, labels=names)
        family.add_metric(values, value)
        return family

    if load_known:  # with the other scheduler gauges: after the engine reported its state
        yield gauge("num_requests_swapped", "Requests swapped to CPU (never: no swap space).", 0)
        yield gauge("cpu_cache_usage_perc", "CPU KV cache usage (no CPU KV cache).", 0.0)
        yield gauge("cpu_prefix_cache_hit_rate", "CPU prefix cache hit rate (no CPU cache).",
                    0.0)
    yield gauge("avg_prompt_throughput_toks_per_s",
                "Prompt tokens per second over the last 5 s (deprecated: rate the counter).",
                throughput[0])
    yield gauge("avg_generation_throughput_toks_per_s",
                "Generated tokens per second over the last 5 s (deprecated: rate the counter).",
                throughput[1])
    # vLLM v0.6.4 sets this on every stats log, LoRA enabled or not (max_lora "0" without),
    # to the current time: the endpoint picker keeps the series with the newest value.
    lora = GaugeMetricFamily(f"{prefix}:lora_requests_info", "Running stats on LoRA requests.",
                             labels=["running_lora_adapters", "max_lora",
                                     "waiting_lora_adapters"])
    lora.add_metric(list(lora_labels), time.time())
    yield lora
    # Speculative decoding and per-step model timings: vLLM registers these families but
    # fills them only when that feature runs, so they show their # TYPE line and no sample.
    for name in () if spec_decode_known else (
            "spec_decode_draft_acceptance_rate", "spec_decode_efficiency"):
        yield GaugeMetricFamily(f"{prefix}:{name}", "Speculative decoding (not used).",
                                labels=names)
    for name in () if spec_decode_known else (
            "spec_decode_num_accepted_tokens", "spec_decode_num_draft_tokens",
            "spec_decode_num_emitted_tokens"):
        yield CounterMetricFamily(f"{prefix}:{name}", "Speculative decoding (not used).",
                                  labels=names)
    for name in ("model_forward_time_milliseconds", "model_execute_time_milliseconds"):
        yield HistogramMetricFamily(f"{prefix}:{name}",
                                    "Per-step model time (only with detailed traces).",
                                    labels=names)
