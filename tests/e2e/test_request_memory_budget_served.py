"""--max-request-memory over REST: the original OOM request shape (many choices, each within
--max-n) against a small budget. A request over the whole budget is a 400 naming the field
that drives it; concurrent n=128 requests that fit alone but not together: the excess gets
429 + Retry-After (as --max-queue-len, which is not set here, so the budget is what refuses)
while the admitted ones return all their choices. The gRPC side and every finish path's
accounting: tests/engine/server/test_request_memory_budget.py."""
from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from engine_process import EngineProcess

from engine.server.admission import generate_cost
from protoserve.v1 import common_pb2, inference_pb2

BUDGET = 1024 * 1024  # --max-request-memory 1MiB
MAX_MODEL_LEN = 512  # the tiny Llama's context


@pytest.fixture(scope="module")
def server(shared_server: Callable[..., EngineProcess]) -> EngineProcess:
    return shared_server("--max-request-memory", "1MiB", role="all")


def _body(n: int, max_tokens: int) -> dict:
    return {"prompt": "hi", "n": n, "max_tokens": max_tokens, "temperature": 1,
            "ignore_eos": True}


def _cost(n: int, max_tokens: int) -> int:
    """The server's estimate of `_body(n, max_tokens)` (the prompt: 2 bytes)."""
    sampling = common_pb2.SamplingParams(n=n, max_tokens=max_tokens)
    request = inference_pb2.GenerateRequest(text="hi", sampling=sampling)
    return generate_cost(request, MAX_MODEL_LEN, 20).total


@pytest.mark.parametrize(("n", "max_tokens", "param"), [(128, 60, "n"), (64, 500, "max_tokens")])
def test_a_request_over_the_whole_budget_is_a_400_naming_its_field(
    server: EngineProcess, n: int, max_tokens: int, param: str
) -> None:
    assert _cost(n, max_tokens) > BUDGET
    response = httpx.post(f"{server.http_url}/v1/completions", json=_body(n, max_tokens),
                          timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "--max-request-memory" in error["message"]


def test_concurrent_n128_requests_beyond_the_budget_get_429_while_the_rest_complete(
    server: EngineProcess,
) -> None:
    # 128 x 14 tokens: fewer events than the engine buffers per request (2048), so a bridge
    # on a busy machine never falls behind into SLOW_CONSUMER (also a 429).
    cost = _cost(128, 14)
    assert cost <= BUDGET < 2 * cost  # one fits at a time

    def post(_: int) -> httpx.Response:
        return httpx.post(f"{server.http_url}/v1/completions", json=_body(128, 14), timeout=120)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, [r.text for r in responses]
    assert 200 in statuses and 429 in statuses, [r.text[-120:] for r in responses]
    for response in responses:
        if response.status_code == 200:
            assert len(response.json()["choices"]) == 128
        else:
            assert int(response.headers["Retry-After"]) >= 1
            error = response.json()["error"]
            assert error["code"] == "MEMORY_BUDGET_FULL", error
            assert "--max-request-memory" in error["message"]
    # Every share was returned: one more still fits (a retry or two, as the hint says: a
    # share is returned when the engine's stream ends, just after the bridge's response).
    for _ in range(20):
        again = post(0)
        if again.status_code != 429:
            break
        time.sleep(0.25)
    assert again.status_code == 200 and len(again.json()["choices"]) == 128
