"""The reference server's (vLLM's) /metrics families, with their Prometheus type and label
names, written from the reference notes (v0.6.4's `Metrics`, section 10) plus V1's
kv_cache_usage_perc / prefix_cache_* and the best_of histogram of vLLM <= 0.6.3: what
`--metrics-compat` must export under `vllm:`. Kept apart from the code under test so the
tests compare the implementation against the reference, not against itself."""
from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

MODEL = ("model_name",)
# vLLM's CacheConfig attributes (v0.6.4), the labels of cache_config_info.
CACHE_CONFIG_LABELS = (
    "block_size", "gpu_memory_utilization", "swap_space_bytes", "num_gpu_blocks_override",
    "cache_dtype", "is_attention_free", "sliding_window", "enable_prefix_caching",
    "cpu_offload_gb", "num_gpu_blocks", "num_cpu_blocks",
)
REFERENCE_FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    **{name: ("gauge", MODEL) for name in (
        "num_requests_running", "num_requests_waiting", "num_requests_swapped",
        "gpu_cache_usage_perc", "cpu_cache_usage_perc", "kv_cache_usage_perc",
        "gpu_prefix_cache_hit_rate", "cpu_prefix_cache_hit_rate",
        "avg_prompt_throughput_toks_per_s", "avg_generation_throughput_toks_per_s",
        "spec_decode_draft_acceptance_rate", "spec_decode_efficiency")},
    "lora_requests_info": ("gauge", ("running_lora_adapters", "max_lora",
                                     "waiting_lora_adapters")),
    "cache_config_info": ("gauge", CACHE_CONFIG_LABELS),
    **{name: ("counter", MODEL) for name in (
        "num_preemptions", "prompt_tokens", "generation_tokens", "tokens",
        "prefix_cache_queries", "prefix_cache_hits", "spec_decode_num_accepted_tokens",
        "spec_decode_num_draft_tokens", "spec_decode_num_emitted_tokens")},
    "request_success": ("counter", (*MODEL, "finished_reason")),
    **{name: ("histogram", MODEL) for name in (
        "time_to_first_token_seconds", "time_per_output_token_seconds",
        "e2e_request_latency_seconds", "request_queue_time_seconds",
        "request_inference_time_seconds", "request_prefill_time_seconds",
        "request_decode_time_seconds", "time_in_queue_requests",
        "model_forward_time_milliseconds", "model_execute_time_milliseconds",
        "iteration_tokens_total", "request_prompt_tokens", "request_generation_tokens",
        "request_max_num_generation_tokens", "request_params_n", "request_params_max_tokens",
        "request_params_best_of")},
}
# Only meaningful for compatibility: nothing here has swap, a CPU cache, LoRA, speculative
# decoding or per-step model timings; the rest are deprecated duplicates.
COMPAT_ONLY = frozenset({
    "num_requests_swapped", "cpu_cache_usage_perc", "cpu_prefix_cache_hit_rate",
    "avg_prompt_throughput_toks_per_s", "avg_generation_throughput_toks_per_s",
    "spec_decode_draft_acceptance_rate", "spec_decode_efficiency", "lora_requests_info",
    "spec_decode_num_accepted_tokens", "spec_decode_num_draft_tokens",
    "spec_decode_num_emitted_tokens", "time_in_queue_requests",
    "model_forward_time_milliseconds", "model_execute_time_milliseconds",
})


def parse(text: str) -> dict[str, tuple[str, list]]:
    """Prometheus text -> {family name: (type, samples)} (counters without `_total`)."""
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(text)}


def scrape_families(url: str) -> dict[str, tuple[str, list]]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return parse(reply.read().decode())


def value(families, name: str, suffix: str = "", **labels: str) -> float | None:
    """The sample `name + suffix` of family `name` whose labels include `labels`."""
    for sample in families[name][1]:
        if sample.name == name + suffix and labels.items() <= sample.labels.items():
            return sample.value
    return None


def reasons(families, name: str, label: str = "finished_reason") -> dict[str, float]:
    return {s.labels[label]: s.value for s in families[name][1]}


def missing_or_wrong(families, prefix: str = "vllm") -> list[str]:
    """Reference families absent, of another type, or with other label names."""
    problems = []
    for name, (kind, labels) in REFERENCE_FAMILIES.items():
        family = f"{prefix}:{name}"
        if family not in families:
            problems.append(f"{family}: missing")
        elif families[family][0] != kind:
            problems.append(f"{family}: {families[family][0]}, not {kind}")
        else:
            problems += [f"{family}: labels {sorted(s.labels)}" for s in families[family][1]
                         if set(s.labels) - {"le"} != set(labels)]
    return problems
