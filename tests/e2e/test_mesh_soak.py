"""Soak: many short requests (a quarter cancelled mid-stream) through the engine; the RSS of the
serving process and of its engine core process at the end each stay within 5% of their RSS
after the first 100 (state released on every exit path).

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
from engine_process import core_process_pids, start_engine
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
                pids = {"server": engine.process.pid}
                pids.update(("core", pid) for pid in core_process_pids(engine.process.pid))
                assert "core" in pids, "engine-serve runs its engine core in a process"
                baseline = {name: _rss_kib(pid) for name, pid in pids.items()}
                # Five legs, RSS after each: a leak grows every leg, a warm-up only the first.
                legs = [warm + (NUM_REQUESTS - warm) * k // 5 for k in range(6)]
                for start, end in zip(legs, legs[1:]):
                    list(pool.map(one, range(start, end)))
                    wait_idle(channel)
                    print(f"\nsoak: after {end} requests RSS KiB "
                          + ", ".join(f"{name} {_rss_kib(pid)}" for name, pid in pids.items()))
            final = {name: _rss_kib(pid) for name, pid in pids.items()}
        for name in pids:
            print(f"\nsoak: {NUM_REQUESTS} requests; {name} RSS {baseline[name]} KiB after "
                  f"{warm}, {final[name]} KiB at the end "
                  f"({(final[name] - baseline[name]) / baseline[name]:+.2%})")
        for name in pids:
            assert final[name] <= baseline[name] * 1.05, (
                f"{name} RSS grew from {baseline[name]} KiB to {final[name]} KiB")
    finally:
        engine.stop()
