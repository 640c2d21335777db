"""--metrics-compat on a real engine-serve: its --metrics-port page, and the bridge's /metrics
on the serving port, export the reference server's (vLLM's) families with its names, types
and label names, so dashboards, KEDA and the Gateway API Inference Extension written for vLLM
work unchanged. Counts are checked exactly (finish reasons that happened and no others, one
inter-token sample per token gap, prefix-cache tokens of a repeated prompt); nothing is timed."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from engine_process import EngineProcess, free_port
from metrics_reference import (
    CACHE_CONFIG_LABELS,
    missing_or_wrong,
    reasons,
    scrape_families,
    value,
)
from mesh_helpers import long_request, open_stream, wait_idle

from protoserve.v1 import (
    common_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)

pytestmark = pytest.mark.e2e

# Long enough to fill several KV blocks (16 tokens each), so a repeat hits the prefix cache.
REPEATED_PROMPT = " ".join(f"line {i} of a system prompt every request shares" for i in range(12))


class Served:
    def __init__(self, server: EngineProcess, metrics_url: str) -> None:
        self.server = server
        self.metrics_url = metrics_url
        self.channel = grpc.insecure_channel(server.grpc_address)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        # Before any request: this module's tests are the server's only clients.
        self.fresh_page = self.engine_page()

    def engine_page(self):
        return scrape_families(self.metrics_url)

    def bridge_page(self):
        return scrape_families(f"{self.server.http_url}/metrics")

    def generate(self, request: inference_pb2.GenerateRequest) -> list[int]:
        """Completion tokens of each choice (the request streams to its end)."""
        return [event.finished.completion_tokens
                for event in self.stub.Generate(request, timeout=120)
                if event.WhichOneof("event") == "finished"]


@pytest.fixture(scope="module")
def served(shared_server: Callable[..., EngineProcess],
           long_context_model_dir: Path) -> Iterator[Served]:
    # The metrics port makes the flag set, and so the server, this module's own. The long
    # context lets a stream outlast the cancel that ends it.
    port = free_port()
    server = shared_server("--metrics-compat", "--metrics-port", str(port), role="all",
                           model_dir=long_context_model_dir)
    served = Served(server, f"http://127.0.0.1:{port}/metrics")
    yield served
    served.channel.close()


def _greedy(text: str = "hello there", **sampling) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        text=text, sampling=common_pb2.SamplingParams(temperature=0.0, **sampling))


def _grew(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: count - before.get(key, 0) for key, count in after.items()
            if count != before.get(key, 0)}


def test_engine_port_exports_the_reference_set_and_counts_what_happened(served) -> None:
    # Nothing has finished on a fresh server: no finish reason has a series (none pre-created).
    assert served.fresh_page["vllm:request_success"][1] == []
    wait_idle(served.channel)
    before = served.engine_page()
    completions = [served.generate(_greedy(max_tokens=n, ignore_eos=True))[0] for n in (3, 5, 7)]
    assert completions == [3, 5, 7]
    # A stop token met on the way (greedy decoding repeats the probe's tokens).
    probe = [t for event in served.stub.Generate(_greedy(max_tokens=2, ignore_eos=True),
                                                 timeout=60)
             if event.WhichOneof("event") == "delta" for t in event.delta.token_ids]
    completions.append(len(probe))
    completions += served.generate(_greedy(max_tokens=10, stop_token_ids=[probe[1]]))
    wait_idle(served.channel)
    page = served.engine_page()
    assert missing_or_wrong(page) == []
    assert missing_or_wrong(page, "protoserve") == [
        f"protoserve:{name}: missing" for name in (
            "num_requests_swapped", "cpu_cache_usage_perc", "cpu_prefix_cache_hit_rate",
            "avg_prompt_throughput_toks_per_s", "avg_generation_throughput_toks_per_s",
            "spec_decode_draft_acceptance_rate", "spec_decode_efficiency",
            "lora_requests_info", "spec_decode_num_accepted_tokens",
            "spec_decode_num_draft_tokens", "spec_decode_num_emitted_tokens",
            "time_in_queue_requests", "model_forward_time_milliseconds",
            "model_execute_time_milliseconds")]
    assert _grew(reasons(page, "vllm:request_success"),
                 reasons(before, "vllm:request_success")) == {"length": 4, "stop": 1}

    def grew(name: str, suffix: str = "") -> float:
        return value(page, name, suffix) - value(before, name, suffix)

    # One inter-token sample per gap between a request's tokens, under every name for it.
    gaps = sum(tokens - 1 for tokens in completions)
    for name in ("vllm:time_per_output_token_seconds", "vllm:inter_token_latency_seconds",
                 "protoserve:time_per_output_token_seconds"):
        assert grew(name, "_count") == gaps, name
    assert grew("vllm:request_time_per_output_token_seconds", "_count") == len(completions)
    assert grew("vllm:generation_tokens", "_total") == sum(completions)
    assert value(page, "vllm:num_requests_swapped") == 0.0

    # A client that goes away: vLLM's reason for it is abort; ours says why.
    call = open_stream(served.channel, long_request())
    call.cancel()
    wait_idle(served.channel)
    last = served.engine_page()
    assert _grew(reasons(last, "vllm:request_success"),
                 reasons(page, "vllm:request_success")) == {"abort": 1}
    assert _grew(reasons(last, "protoserve:request_success"),
                 reasons(page, "protoserve:request_success")) == {"cancelled": 1}


def test_cache_config_info_carries_the_engine_cache_settings(served) -> None:
    info = discovery_pb2_grpc.DiscoveryStub(served.channel).GetModelInfo(
        discovery_pb2.GetModelInfoRequest(), timeout=10).info
    engine, bridge = served.engine_page(), served.bridge_page()
    for page, prefix in ((engine, "vllm"), (engine, "protoserve"), (bridge, "vllm")):
        [sample] = page[f"{prefix}:cache_config_info"][1]
        assert sample.value == 1.0
        assert set(sample.labels) == set(CACHE_CONFIG_LABELS)  # no model_name, as vLLM's
        assert sample.labels["block_size"] == str(info.block_size) == "16"
        assert sample.labels["num_gpu_blocks"] == str(info.num_kv_blocks)
    [sample] = engine["vllm:cache_config_info"][1]
    assert sample.labels == {
        "block_size": "16", "num_gpu_blocks": str(info.num_kv_blocks),
        "gpu_memory_utilization": "0.9", "swap_space_bytes": "0",
        "num_gpu_blocks_override": "None", "cache_dtype": "auto", "is_attention_free": "False",
        "sliding_window": "None", "enable_prefix_caching": "True", "cpu_offload_gb": "0",
        "num_cpu_blocks": "0"}


def test_prefix_cache_counters_count_a_repeated_prompt(served) -> None:
    wait_idle(served.channel)
    before = served.engine_page()
    for _ in range(2):
        served.generate(_greedy(REPEATED_PROMPT, max_tokens=1))
    wait_idle(served.channel)
    after = served.engine_page()

    def grew(name: str) -> float:
        return value(after, name, "_total") - value(before, name, "_total")

    prompt = grew("vllm:prompt_tokens") / 2
    assert prompt > 48
    # Both requests looked their prompt up; the second found its full blocks cached.
    assert grew("vllm:prefix_cache_queries") >= 2 * prompt - 1
    assert 16 <= grew("vllm:prefix_cache_hits") <= prompt
    assert grew("protoserve:prefix_cache_hits") == grew("vllm:prefix_cache_hits")
    rate = value(after, "vllm:prefix_cache_hits", "_total") / value(
        after, "vllm:prefix_cache_queries", "_total")
    assert value(after, "vllm:gpu_prefix_cache_hit_rate") == pytest.approx(rate)


def test_bridge_serving_port_has_what_a_vllm_router_scrapes(served) -> None:
    """The endpoint picker scrapes the serving port: the engine's numbers, by vLLM's names."""
    wait_idle(served.channel)
    bridge, engine = served.bridge_page(), served.engine_page()
    for name, kind in (("vllm:num_requests_waiting", "gauge"),
                       ("vllm:num_requests_running", "gauge"),
                       ("vllm:kv_cache_usage_perc", "gauge"),
                       ("vllm:gpu_cache_usage_perc", "gauge"),
                       ("vllm:lora_requests_info", "gauge"),
                       ("vllm:cache_config_info", "gauge"),
                       ("vllm:prefix_cache_queries", "counter"),
                       ("vllm:prefix_cache_hits", "counter")):
        assert bridge[name][0] == kind, name
    for name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits"):
        assert value(bridge, name, "_total") == value(engine, name, "_total"), name
    model = discovery_pb2_grpc.DiscoveryStub(served.channel).GetModelInfo(
        discovery_pb2.GetModelInfoRequest(), timeout=10).info.id
    assert {s.labels["model_name"] for s in bridge["vllm:num_requests_waiting"][1]} == {model}
    assert {s.labels["model_name"] for s in engine["vllm:num_requests_waiting"][1]} == {model}
