"""The bridge's /metrics as a router written for vLLM scrapes it on the serving port: the
engine's queue, KV, prefix-cache and LoRA numbers from GetLoad, cache_config_info from Discovery,
and one inter-token sample per token gap of the streams it relays."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from protoserve.v1 import common_pb2, discovery_pb2, inference_pb2
from rest_bridge.metrics import BridgeMetrics


def _families(text: bytes) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text.decode())}


def _value(families, name: str, sample_name: str | None = None) -> float:
    [value] = [s.value for s in families[name] if s.name == (sample_name or name)]
    return value


def test_engine_numbers_and_cache_config_from_discovery() -> None:
    bridge = BridgeMetrics(compat=True)
    load = discovery_pb2.GetLoadResponse(
        num_requests_waiting=3, kv_cache_usage=0.5, num_prefix_cache_queried_tokens=40,
        num_prefix_cache_hit_tokens=16, running_lora_adapters=["alpha", "beta"],
        waiting_lora_adapters=["gamma"], max_lora=2)
    # Before the model is known: no cache_config_info rather than one with guessed labels.
    assert "vllm:cache_config_info" not in _families(bridge.render(load))
    bridge.describe_model(discovery_pb2.ModelInfo(id="tiny", block_size=16, num_kv_blocks=64))
    families = _families(bridge.render(load))
    assert _value(families, "vllm:num_requests_waiting") == 3
    assert _value(families, "vllm:kv_cache_usage_perc") == 0.5
    assert _value(families, "vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total") == 40
    assert _value(families, "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total") == 16
    [info] = families["vllm:cache_config_info"]
    # What the endpoint picker parses as integers is known; the engine's flags are not.
    assert info.labels["block_size"] == "16" and info.labels["num_gpu_blocks"] == "64"
    assert info.labels["enable_prefix_caching"] == ""
    assert {s.labels["model_name"] for s in families["vllm:num_requests_waiting"]} == {"tiny"}
    [lora] = families["vllm:lora_requests_info"]
    assert lora.labels == {"running_lora_adapters": "alpha,beta", "max_lora": "2",
                           "waiting_lora_adapters": "gamma"}


def test_tracker_observes_each_token_gap() -> None:
    bridge = BridgeMetrics()
    request = inference_pb2.GenerateRequest(
        text="hi", sampling=common_pb2.SamplingParams(n=1, best_of=2, max_tokens=5))
    tracker = bridge.tracker(request)
    tracker.on_response(inference_pb2.GenerateResponse(
        started=inference_pb2.GenerateStarted(prompt_tokens=2)))
    for token in range(5):
        tracker.on_response(inference_pb2.GenerateResponse(
            delta=inference_pb2.GenerateDelta(index=0, token_ids=[token])))
    tracker.on_response(inference_pb2.GenerateResponse(finished=inference_pb2.GenerateFinished(
        index=0, reason=inference_pb2.FINISH_REASON_LENGTH, completion_tokens=5)))
    tracker.finish(None)
    families = _families(bridge.render(None))
    itl = "protoserve:time_per_output_token_seconds"
    assert _value(families, itl, f"{itl}_count") == 4
    best_of = "protoserve:request_params_best_of"
    assert _value(families, best_of, f"{best_of}_sum") == 2
