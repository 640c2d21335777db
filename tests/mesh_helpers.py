"""Helpers for the service-mesh tests: long streams, load polling, metrics scraping."""
from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protoserve.v1 import (
    common_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)

READINESS = "protoserve.v1.Inference"


def build_long_context_model(path: Path) -> Path:
    """The suite's tiny Llama with a long context, so a stream can outlast a test's checks."""
    from model_factory import build_tiny_model

    return build_tiny_model(path, max_position_embeddings=8192)


def long_request(request_id: str = "", max_tokens: int = 6000) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        text="hello there", request_id=request_id,
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                           ignore_eos=True),
    )


def short_request(max_tokens: int = 4) -> inference_pb2.GenerateRequest:
    return long_request(max_tokens=max_tokens)


def get_load(channel: grpc.Channel) -> discovery_pb2.GetLoadResponse:
    return discovery_pb2_grpc.DiscoveryStub(channel).GetLoad(discovery_pb2.GetLoadRequest(),
                                                             timeout=10)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until `predicate()`; returns the seconds it took. Generous bounds: shared CPUs."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def wait_idle(channel: grpc.Channel, timeout: float = 20.0) -> discovery_pb2.GetLoadResponse:
    """Until no request runs or waits and every KV block is free again."""
    def idle() -> bool:
        load = get_load(channel)
        return (load.num_requests_running == 0 and load.num_requests_waiting == 0
                and load.num_free_kv_blocks == load.num_kv_blocks and load.num_streams == 0)
    wait_until(idle, timeout, "the engine is idle with every KV block free")
    return get_load(channel)


def open_stream(channel: grpc.Channel, request: inference_pb2.GenerateRequest, **kwargs):
    """Start a Generate call and read its `started` event and first delta."""
    call = inference_pb2_grpc.InferenceStub(channel).Generate(request, **kwargs)
    first = next(call)
    assert first.WhichOneof("event") == "started"
    return call


def finished_reasons(call: Iterable[inference_pb2.GenerateResponse]) -> list[int]:
    """The `finished` reasons of a Generate stream, read to its end."""
    return [r.finished.reason for r in call if r.WhichOneof("event") == "finished"]


def seconds_until_unavailable(call: Iterable[inference_pb2.GenerateResponse]) -> float:
    """Reads a Generate stream until it fails, which must be with UNAVAILABLE."""
    start = time.monotonic()
    try:
        for _ in call:
            pass
    except grpc.RpcError as failed:
        assert failed.code() == grpc.StatusCode.UNAVAILABLE, failed
        return time.monotonic() - start
    raise AssertionError("the stream ended normally; expected UNAVAILABLE")


def readiness(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=READINESS), timeout=5).status


def scrape(url: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (comments dropped)."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def sample(samples: dict[str, float], name: str, **labels: str) -> float:
    """The value of `name` whose labels include `labels` (0 when absent)."""
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            return value
    return 0.0
