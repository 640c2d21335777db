"""The Prometheus collector both servers use: under `vllm:` (--metrics-compat) the reference
server's families with its types and label names; a finish reason's series only once it
happened; one inter-token observation per token gap; cache_config_info's labels."""
from __future__ import annotations

import pytest
from metrics_reference import (
    CACHE_CONFIG_LABELS,
    COMPAT_ONLY,
    REFERENCE_FAMILIES,
    missing_or_wrong,
    parse,
    reasons,
)
from metrics_reference import value as _sample

from protoserve import vllm_compat
from protoserve.serving_metrics import (
    InterTokenTimer,
    LoadSnapshot,
    RequestRecord,
    ServingMetrics,
)
from protoserve.vllm_compat import cache_config_labels


def _engine_like(**kwargs) -> ServingMetrics:
    from protoserve.histogram import Histogram

    load = LoadSnapshot(1, 2, 0.5, 0.25, 3, num_queried_tokens=100, num_hit_tokens=25,
                        iteration_tokens=Histogram((1, 8)))
    cache = cache_config_labels(block_size=16, num_gpu_blocks=64, gpu_memory_utilization=0.9,
                                num_gpu_blocks_override=None, enable_prefix_caching=True)
    return ServingMetrics("m", load=lambda: load, cache_config=lambda: cache,
                          request_phases=True, **kwargs)


def _families(metrics: ServingMetrics) -> dict[str, tuple[str, list]]:
    return parse(metrics.render().decode())


def test_compat_prefix_has_every_reference_family_with_its_type_and_labels() -> None:
    metrics = _engine_like(compat_prefixes=("vllm",))
    metrics.record(RequestRecord("stop", 3, 2, 1.0, 0.1, n=1, queue_s=0.1, prefill_s=0.1,
                                 decode_s=0.5, inference_s=0.6, max_generation_tokens=2))
    families = _families(metrics)
    assert missing_or_wrong(families) == []
    for name in REFERENCE_FAMILIES:
        # The same set under our prefix, less what only makes sense for compatibility.
        assert (f"protoserve:{name}" in families) == (name not in COMPAT_ONLY), name
    # Families of features this engine lacks show their # TYPE line and no sample, as the
    # reference's do while the feature is off.
    assert families["vllm:spec_decode_num_draft_tokens"][1] == []
    assert _sample(families, "vllm:num_requests_swapped", model_name="m") == 0.0
    assert _sample(families, "vllm:prefix_cache_queries", "_total") == 100.0
    assert _sample(families, "vllm:prefix_cache_hits", "_total") == 25.0
    assert _sample(families, "vllm:kv_cache_usage_perc") == 0.5
    assert _sample(families, "vllm:time_in_queue_requests", "_count") == 1.0
    assert _sample(families, "vllm:inter_token_latency_seconds", "_count") == 0.0
    # Info-style gauges carry no model_name, as the reference's.
    [info] = families["vllm:cache_config_info"][1]
    assert info.value == 1.0 and info.labels["block_size"] == "16"
    [lora] = families["vllm:lora_requests_info"][1]
    assert lora.labels == {"running_lora_adapters": "", "max_lora": "0",
                           "waiting_lora_adapters": ""} and lora.value > 0


def test_finish_reason_series_appear_only_once_they_happen() -> None:
    metrics = ServingMetrics("m", compat_prefixes=("vllm",))
    families = _families(metrics)
    assert families["vllm:request_success"][1] == []
    assert families["protoserve:request_aborted"][1] == []
    metrics.record(RequestRecord("length", 3, 2, 1.0))
    families = _families(metrics)
    assert [s.labels["finished_reason"] for s in families["vllm:request_success"][1]] == [
        "length"]
    for reason in ("cancelled", "deadline", "abort", "error"):
        metrics.record(RequestRecord(reason, 3, 0, 1.0))
    families = _families(metrics)
    # Ours keep why a request ended early; vLLM's vocabulary has abort for all three.
    assert reasons(families, "protoserve:request_success") == {
        "length": 1, "cancelled": 1, "deadline": 1, "abort": 1, "error": 1}
    assert reasons(families, "vllm:request_success") == {"length": 1, "abort": 3, "error": 1}
    assert reasons(families, "protoserve:request_aborted", "reason") == {
        "cancelled": 1, "deadline": 1, "abort": 1, "error": 1}


def test_inter_token_gaps_are_observed_per_token_and_choice() -> None:
    metrics = ServingMetrics("m")
    timer = InterTokenTimer(metrics)
    timer.on_tokens(0, 1, 10.0)  # a choice's first token: no gap yet
    timer.on_tokens(1, 1, 10.5)
    timer.on_tokens(0, 1, 10.25)
    timer.on_tokens(0, 2, 10.75)  # two tokens together: two gaps of 0.25
    timer.on_tokens(1, 0, 11.0)  # text without tokens
    timer.on_tokens(1, 1, 11.0)
    families = _families(metrics)
    assert _sample(families, "protoserve:time_per_output_token_seconds", "_count") == 4
    assert _sample(families, "protoserve:time_per_output_token_seconds", "_sum") == 1.25
    assert _sample(families, "protoserve:inter_token_latency_seconds", "_count") == 4
    # A choice that arrives whole (beam search) has no gaps to measure.
    InterTokenTimer(metrics).on_tokens(0, 5, 12.0)
    assert _sample(_families(metrics), "protoserve:time_per_output_token_seconds",
                   "_count") == 4
    InterTokenTimer(None).on_tokens(0, 1, 1.0)  # no metrics: nothing to record


def test_per_request_histograms_best_of_and_longest_choice() -> None:
    metrics = ServingMetrics("m")
    metrics.record(RequestRecord("length", 3, 10, 2.0, 1.0, n=2, best_of=4,
                                 max_generation_tokens=6))
    metrics.record(RequestRecord("length", 3, 1, 2.0, 1.0, n=1))
    families = _families(metrics)
    assert _sample(families, "protoserve:request_params_best_of", "_sum") == 5  # n when unset
    assert _sample(families, "protoserve:request_max_num_generation_tokens", "_sum") == 6
    # Per request: (e2e - ttft) / (tokens - 1), for requests with more than one token.
    assert _sample(families, "protoserve:request_time_per_output_token_seconds",
                   "_count") == 1
    assert _sample(families, "protoserve:request_time_per_output_token_seconds",
                   "_sum") == pytest.approx(1.0 / 9)


def test_cache_config_labels_in_reference_order() -> None:
    labels = cache_config_labels(block_size=16, num_gpu_blocks=64, gpu_memory_utilization=0.9,
                                 num_gpu_blocks_override=None, enable_prefix_caching=True)
    assert tuple(labels) == CACHE_CONFIG_LABELS
    assert labels == {
        "block_size": "16", "gpu_memory_utilization": "0.9", "swap_space_bytes": "0",
        "num_gpu_blocks_override": "None", "cache_dtype": "auto", "is_attention_free": "False",
        "sliding_window": "None", "enable_prefix_caching": "True", "cpu_offload_gb": "0",
        "num_gpu_blocks": "64", "num_cpu_blocks": "0"}
    # What the caller cannot know stays empty rather than guessed (the bridge).
    partial = cache_config_labels(block_size=16, num_gpu_blocks=64)
    assert partial["gpu_memory_utilization"] == partial["enable_prefix_caching"] == ""
    with pytest.raises(ValueError, match="not a cache_config_info label"):
        cache_config_labels(block_sizes=16)


def test_throughput_gauges_roll_over_a_window(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(vllm_compat.time, "monotonic", lambda: clock[0])
    window = vllm_compat.ThroughputWindow()
    assert window.rates(50, 10) == (0.0, 0.0)  # inside the first window: not rolled yet
    clock[0] += 10.0
    assert window.rates(50, 10) == (5.0, 1.0)
    clock[0] += 1.0
    assert window.rates(80, 20) == (5.0, 1.0)  # held until the next window closes
    clock[0] += 4.0
    assert window.rates(80, 20) == (6.0, 2.0)
