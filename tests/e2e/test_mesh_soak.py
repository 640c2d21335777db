"""Soak: many short requests through the engine (a quarter cancelled mid-stream, every tenth
guided by a choice constraint): nothing a request leaves behind outlives it, in the serving
process or in its engine core process.

The leak check is a census of live objects by type, taken in both processes by
tests/e2e/leak_probe/sitecustomize.py once the engine is warm and again at the end. Warm means
after the warm-up requests (whose guided ones wait for the guided-decoding library, which
start-up imports in the background) and one more leg: from there on each type's count comes
back to within a few objects after every leg, however busy the machine, while a leak of one
object per cancelled (or guided) request adds dozens.

RSS is printed after every leg (README's soak figure). A busy machine moves it by whole
percents at a time (allocator arenas, start-up work that finishes late), so it fails the test
only when it grows steadily: by more than 1% in both halves of the legs after warm-up.

CI runs a small count (400). The full soak is 10,000 requests (the last result is in README's
Performance section):

    PROTOSERVE_SOAK_REQUESTS=10000 .venv/bin/python -m pytest -q -s tests/e2e/test_mesh_soak.py

`-s` shows the lines the test prints."""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from engine_process import core_process_pids, start_engine
from mesh_helpers import short_request, wait_idle, wait_until

from protoserve.v1 import inference_pb2_grpc

NUM_REQUESTS = int(os.environ.get("PROTOSERVE_SOAK_REQUESTS", "400"))
PROBE = Path(__file__).resolve().parent / "leak_probe"
# Legs after the warm-up requests: the first finishes warming up, the other six are measured.
NUM_LEGS = 7
# Objects one type may gain over the measured legs; a warm engine's counts vary by <= 4.
LEAK_SLACK = 24
# RSS growth, as a fraction, that both halves of the measured legs must show to fail.
STEADY_RSS_GROWTH = 0.01


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _census(probe_dir: Path, pids: dict[str, int]) -> dict[str, dict[str, int]]:
    """Live objects by type in each process (gc-tracked, after a collection)."""
    for pid in pids.values():
        (probe_dir / f"{pid}.json").unlink(missing_ok=True)
        (probe_dir / f"{pid}.want").touch()
    wait_until(lambda: all((probe_dir / f"{pid}.json").exists() for pid in pids.values()),
               120, "every process wrote its census")
    return {name: json.loads((probe_dir / f"{pid}.json").read_text())
            for name, pid in pids.items()}


def _gained(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    grown = {kind: count - before.get(kind, 0) for kind, count in after.items()}
    return {kind: n for kind, n in sorted(grown.items()) if n > LEAK_SLACK}


def _one(stub: inference_pb2_grpc.InferenceStub, i: int) -> None:
    request = short_request(max_tokens=4 + i % 5)
    request.text = f"soak request {i} " * (1 + i % 7)  # varied prompts and lengths
    if i % 10 == 2:  # some of these are cancelled too
        request.constraint.choice.choices.extend(["yes", "no", "maybe"])
    call = stub.Generate(request, timeout=60)
    if i % 4 == 0:
        next(call)
        call.cancel()
    else:
        list(call)


@pytest.mark.slow
def test_nothing_outlives_its_request_over_many_requests(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(PROBE),
                                                       os.environ.get("PYTHONPATH")])),
           "PROTOSERVE_LEAK_PROBE_DIR": str(tmp_path)}
    engine = start_engine(tiny_llama_dir, "--max-model-len", "256", "--disable-log-requests",
                          env=env)
    try:
        pids = {"server": engine.process.pid}
        pids.update(("core", pid) for pid in core_process_pids(engine.process.pid))
        assert "core" in pids, "engine-serve runs its engine core in a process"
        warm = min(100, NUM_REQUESTS // 4)
        legs = [warm + (NUM_REQUESTS - warm) * k // NUM_LEGS for k in range(NUM_LEGS + 1)]
        rss: list[dict[str, int]] = []
        with grpc.insecure_channel(engine.grpc_address) as channel, ThreadPoolExecutor(8) as pool:
            stub = inference_pb2_grpc.InferenceStub(channel)
            list(pool.map(lambda i: _one(stub, i), range(warm)))
            for leg, (start, end) in enumerate(zip(legs, legs[1:])):
                list(pool.map(lambda i: _one(stub, i), range(start, end)))
                wait_idle(channel)
                rss.append({name: _rss_kib(pid) for name, pid in pids.items()})
                print(f"\nsoak: after {end} requests RSS KiB "
                      + ", ".join(f"{name} {kib}" for name, kib in rss[-1].items()))
                if leg == 0:
                    baseline = _census(tmp_path, pids)
            final = _census(tmp_path, pids)
        measured = NUM_REQUESTS - legs[1]
        for name in pids:
            print(f"\nsoak: {NUM_REQUESTS} requests; {name} RSS {rss[0][name]} KiB after "
                  f"{legs[1]}, {rss[-1][name]} KiB at the end "
                  f"({(rss[-1][name] - rss[0][name]) / rss[0][name]:+.2%}); live objects "
                  f"{sum(baseline[name].values())} -> {sum(final[name].values())}")
        leaks = {name: _gained(baseline[name], final[name]) for name in pids}
        assert not any(leaks.values()), (
            f"objects that {measured} requests left behind, by type: {leaks}")
        mid = len(rss) // 2
        for name in pids:
            halves = [rss[mid][name] - rss[0][name], rss[-1][name] - rss[mid][name]]
            assert min(halves) <= rss[0][name] * STEADY_RSS_GROWTH, (
                f"{name} RSS grew steadily: {[r[name] for r in rss]} KiB after each leg")
    finally:
        engine.stop()
