"""Schemathesis against the bridge's own OpenAPI document: generated requests to every route
never get a 5xx (a live engine behind it, tiny model, few examples per route)."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator

import httpx
import pytest
from engine_process import REPO_ROOT, EngineProcess, free_port
from fuzz_budget import examples
from mesh_helpers import wait_until

schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

pytestmark = pytest.mark.fuzz


@pytest.fixture(scope="module")
def bridge_url(shared_server: Callable[..., EngineProcess]) -> Iterator[str]:
    # The engine of tests/engine/server's gRPC tests (same flags): the bridge is this test's.
    engine = shared_server("--max-model-len", "256")
    port = free_port()
    bridge = subprocess.Popen(
        [sys.executable, "-m", "rest_bridge", "--engine-address", engine.grpc_address,
         "--host", "127.0.0.1", "--port", str(port), "--uvicorn-log-level", "warning"],
        cwd=REPO_ROOT,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/ping", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
    try:
        wait_until(up, 120, "the bridge answers")
        yield url
    finally:
        bridge.terminate()
        bridge.wait(timeout=15)


def test_no_route_answers_5xx(bridge_url: str) -> None:
    # Not schemathesis' pytest plugin (it reaches into pytest internals that moved): the
    # schema's hypothesis strategies, one bounded run per operation.
    from hypothesis import given

    schema = schemathesis.openapi.from_url(f"{bridge_url}/openapi.json")
    failures: list[str] = []
    checked = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=examples(8), deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            # Generated bodies may ask for long generations: cap the work, keep the shape.
            if isinstance(case.body, dict):
                for key in ("max_tokens", "max_completion_tokens", "n", "best_of"):
                    if isinstance(case.body.get(key), int) and case.body[key] > 4:
                        case.body[key] = 4
            response = case.call(base_url=bridge_url, timeout=60)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path} {case.body!r:.300} -> "
                                f"{response.status_code} {response.text[:300]}")

        check()
        checked += 1
    assert checked >= 5
    assert not failures, "\n".join(failures[:10])
