"""The bridge under pressure, against real processes on 127.0.0.1: 200 concurrent streams with
a third of the clients vanishing mid-stream, bridge metrics, deadlines (504), back-pressure
(429 + Retry-After), the engine dying under the bridge (503, then recovery), and bodies built
to break a JSON server."""
from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from engine_process import (
    REPO_ROOT,
    EngineProcess,
    free_port,
    start_for_selected_tests,
    starts_servers,
    stop_side_by_side,
    wait_ready,
)
from mesh_helpers import (
    get_load,
    long_request,
    open_stream,
    sample,
    scrape,
    wait_idle,
    wait_until,
)

from protoserve.v1 import inference_pb2_grpc

BOUND_S = 10.0  # "quickly", generously, on a shared 2-core machine


def start_bridge(engine_address: str, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "rest_bridge", "--engine-address", engine_address,
         "--host", "127.0.0.1", "--port", str(port), "--uvicorn-log-level", "warning", *args],
        cwd=REPO_ROOT,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/ping", timeout=2).status_code == 200
        except httpx.HTTPError:
            return process.poll() is not None
    wait_until(up, 120, "the bridge answers /ping")
    assert process.poll() is None
    return process, url


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def model_dir(long_context_model_dir: Path) -> Path:
    return long_context_model_dir


@pytest.fixture(scope="module")
@starts_servers
def engines(request: pytest.FixtureRequest, model_dir: Path) -> Iterator[dict[str, EngineProcess]]:
    """Side by side, the engines the selected tests need: `served`'s, and the one the timeout
    test kills."""
    started = start_for_selected_tests(request, model_dir, {
        "served": ("--max-num-seqs", "256"),
        "test_timeout_queue_full_and_engine_death_under_the_bridge": (
            "--max-num-seqs", "1", "--max-queue-len", "1"),
    })
    yield started
    stop_side_by_side(list(started.values()))


@pytest.fixture(scope="module")
def served(engines: dict[str, EngineProcess]) -> Iterator[tuple[EngineProcess, str]]:
    engine = engines["served"]
    bridge, url = start_bridge(engine.grpc_address, "--metrics-compat")
    yield engine, url
    stop(bridge)


def _threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


async def _stream_one(client: httpx.AsyncClient, url: str, drop_after: int | None) -> dict:
    body = {"prompt": "one two three", "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    lines: list[str] = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line:
                lines.append(line)
            if drop_after is not None and len(lines) >= drop_after:
                return {"dropped": True}  # leaving the block closes the connection mid-stream
    return {"dropped": False, "lines": lines}


def test_200_concurrent_streams_with_disconnects_leave_nothing_behind(served) -> None:
    engine, url = served
    bridge_pid = _bridge_pid(url)
    # Two waves: thread pools (gRPC, anyio) grow to the first wave's concurrency; a leak shows
    # as growth in the second.
    counts = []
    for wave in range(2):
        _wave(engine, url, random.Random(wave))
        wait_until(lambda: sample(scrape(f"{url}/metrics"), "protoserve:bridge_asyncio_tasks")
                   <= 8, 30, "bridge tasks back to the idle level")
        counts.append((_threads(engine.process.pid), _threads(bridge_pid)))
    assert counts[1][0] <= counts[0][0] + 2 and counts[1][1] <= counts[0][1] + 2, counts
    metrics = scrape(f"{url}/metrics")
    assert sample(metrics, "protoserve:request_success_total", finished_reason="cancelled") > 0
    assert sample(metrics, "vllm:num_requests_running") == 0


def _wave(engine: EngineProcess, url: str, rng: random.Random) -> None:
    plan = [rng.randint(1, 6) if i % 3 == 0 else None for i in range(200)]

    async def run() -> list[dict]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:
            return await asyncio.gather(*(_stream_one(client, url, d) for d in plan))

    results = asyncio.run(run())
    survivors = [r for r in results if not r["dropped"]]
    assert len(survivors) == sum(d is None for d in plan)
    for result in survivors:
        lines = result["lines"]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert reasons[-1] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 8
    with grpc.insecure_channel(engine.grpc_address) as channel:
        wait_idle(channel, 30)  # every KV block back in the pool, nothing running or queued


def _bridge_pid(url: str) -> int:
    port = url.rsplit(":", 1)[1]
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True)
    if out.returncode == 0 and "pid=" in out.stdout:
        return int(out.stdout.split("pid=")[1].split(",")[0])
    pytest.skip("cannot find the bridge pid (no `ss`)")


def test_bridge_metrics_and_health(served) -> None:
    engine, url = served
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{url}/ping", timeout=10).status_code == 200
    before = scrape(f"{url}/metrics")
    body = {"prompt": "one two", "max_tokens": 5, "n": 2, "temperature": 1.0,
            "ignore_eos": True}
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for name in ("protoserve:num_requests_waiting", "vllm:gpu_cache_usage_perc",
                 "protoserve:time_to_first_token_seconds_bucket", "vllm:e2e_request_latency_seconds_sum"):
        assert name in text, name
    after = scrape(f"{url}/metrics")
    for prefix in ("protoserve", "vllm"):
        for name, value in (("request_params_n_sum", 2), ("request_params_max_tokens_sum", 5),
                            ("request_generation_tokens_sum", 10),
                            ("request_prompt_tokens_count", 1)):
            key = f"{prefix}:{name}"
            assert sample(after, key) - sample(before, key) == value, key
    # The queue/prefill/decode split is the engine's to measure (its metrics port).
    assert "request_queue_time_seconds" not in text


def test_bodies_built_to_break_a_json_server(served) -> None:
    _, url = served
    post = f"{url}/v1/completions"
    huge = b'{"prompt": "' + b"a" * (33 * 1024 * 1024) + b'"}'
    assert httpx.post(post, content=huge, timeout=60).status_code == 413
    nested = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert httpx.post(post, content=nested, timeout=60).status_code == 400
    bad_utf8 = b'{"prompt": "\xff\xfe\xfd", "max_tokens": 2}'
    assert httpx.post(post, content=bad_utf8, timeout=60).status_code == 400
    assert httpx.post(post, content=b'{"prompt": ', timeout=60).status_code == 400
    try:  # a 1 MiB header: served, refused or dropped by the HTTP parser; never a crash
        response = httpx.post(post, json={"prompt": "x", "max_tokens": 1}, timeout=60,
                              headers={"x-junk": "a" * (1024 * 1024)})
        assert response.status_code in (200, 400, 431)
    except httpx.HTTPError:
        pass
    bad_id = httpx.post(post, json={"prompt": "x", "max_tokens": 1}, timeout=60,
                        headers={"x-request-id": "\u00e9".encode("latin-1") * 10})
    assert bad_id.status_code == 400
    assert httpx.get(f"{url}/ping", timeout=10).status_code == 200
    ok = httpx.post(post, json={"prompt": "still alive", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_timeout_queue_full_and_engine_death_under_the_bridge(
    model_dir: Path, engines: dict[str, EngineProcess]
) -> None:
    engine = engines["test_timeout_queue_full_and_engine_death_under_the_bridge"]
    # 1 s: the 6000-token request below takes far longer on any machine, so it ends 504.
    bridge, url = start_bridge(engine.grpc_address, "--request-timeout", "1")
    try:
        post = f"{url}/v1/completions"
        long_body = {"prompt": "x", "max_tokens": 6000, "ignore_eos": True, "temperature": 0}
        # --request-timeout becomes the gRPC deadline: 504, and the engine stops the work.
        timed_out = httpx.post(post, json=long_body, timeout=60)
        assert timed_out.status_code == 504, timed_out.text
        with grpc.insecure_channel(engine.grpc_address) as channel:
            wait_idle(channel, BOUND_S)
            # Back-pressure: one running, one queued, the next is refused at once.
            running = open_stream(channel, long_request(), timeout=120)
            next(running)
            queued = inference_pb2_grpc.InferenceStub(channel).Generate(long_request(),
                                                                        timeout=120)
            wait_until(lambda: _waiting(channel) == 1, BOUND_S, "one request queued")
            start = time.monotonic()
            refused = httpx.post(post, json={"prompt": "x", "max_tokens": 2}, timeout=60)
            assert time.monotonic() - start < BOUND_S
            assert refused.status_code == 429, refused.text
            assert int(refused.headers["retry-after"]) >= 1
            running.cancel()
            queued.cancel()
            wait_idle(channel, BOUND_S)
        # The engine dies under the bridge: 503 quickly; a new engine at the address recovers.
        engine.process.kill()
        engine.process.wait(timeout=30)
        start = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=30).status_code == 503
        down = httpx.post(post, json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert down.status_code == 503, down.text
        assert time.monotonic() - start < BOUND_S
        assert httpx.get(f"{url}/ping", timeout=10).status_code == 200
        port = engine.grpc_address.rsplit(":", 1)[1]
        engine = _restart_engine(model_dir, port)
        wait_until(lambda: httpx.get(f"{url}/health", timeout=10).status_code == 200, 60,
                   "the bridge sees the new engine")
        again = httpx.post(post, json={"prompt": "x", "max_tokens": 2}, timeout=60)
        assert again.status_code == 200, again.text
    finally:
        stop(bridge)
        engine.stop()


def _waiting(channel: grpc.Channel) -> int:
    return get_load(channel).num_requests_waiting


def _restart_engine(model_dir: Path, port: str) -> EngineProcess:
    args = [sys.executable, "-m", "protoserve.cli.serve", "--role", "engine",
            "--model", str(model_dir),
            "--host", "127.0.0.1", "--grpc-port", port, "--dtype", "float32",
            "--kv-cache-memory", "64MiB", "--log-level", "warning"]
    process = subprocess.Popen(args, cwd=REPO_ROOT, start_new_session=True)
    handle = EngineProcess(process, f"127.0.0.1:{port}", None)
    wait_ready(handle.grpc_address, process, 180)
    return handle
