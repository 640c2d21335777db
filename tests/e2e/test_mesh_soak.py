"""Soak: many short requests (a quarter cancelled mid-stream) through the engine; its RSS at the
end stays within 5% of the RSS after the first 100 (state released on every exit path).

CI runs a small count (400). The full soak is 10,000 requests (about a minute on 2 cores; the
last result is in README's Performance section):

    PROTOSERVE_SOAK_REQUESTS=10000 .venv/bin/python -m pytest -q -s tests/e2e/test_mesh_soak.py

`-s` shows the RSS line the test prints."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from engine_process import start_engine
from mesh_helpers import short_request, wait_idle

from protoserve.v1 import inference_pb2_grpc

NUM_REQUESTS = int(os.environ.get("PROTOSERVE_SOAK_REQUESTS", "400"))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_rss_is_flat_over_many_requests(tiny_llama_dir: Path) -> None:
    engine = start_engine(tiny_llama_dir, "--max-model-len", "256", "--disable-log-requests")
    try:
        with grpc.insecure_channel(engine.grpc_address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)

            def one(i: int) -> None:
                request = short_request(max_tokens=4 + i % 5)
                request.text = f"soak request {i} " * (1 + i % 7)  # varied prompts and lengths
                call = stub.Generate(request, timeout=60)
                if i % 4 == 0:
                    next(call)
                    call.cancel()
                else:
                    list(call)

            warm = min(100, NUM_REQUESTS // 4)
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(one, range(warm)))
                wait_idle(channel)
                baseline = _rss_kib(engine.process.pid)
                list(pool.map(one, range(warm, NUM_REQUESTS)))
            wait_idle(channel)
            final = _rss_kib(engine.process.pid)
        print(f"\nsoak: {NUM_REQUESTS} requests; engine RSS {baseline} KiB after {warm}, "
              f"{final} KiB at the end ({(final - baseline) / baseline:+.2%})")
        assert final <= baseline * 1.05, f"RSS grew from {baseline} KiB to {final} KiB"
    finally:
        engine.stop()
