"""The engine core in its own process (`--engine-core process`, the default) and on a thread
of the serving process (`--engine-core thread`): the same tokens as transformers for
concurrent streams, the same load numbers, and a core process that never outlives its server."""
from __future__ import annotations

import os
import pickle
import signal
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import grpc
import pytest
from engine_process import (
    EngineProcess,
    core_process_pids,
    start_engine,
    start_side_by_side,
    starts_servers,
    stop_side_by_side,
)
from greedy_reference import NUM_NEW_TOKENS, make_peaked_model, prompts_from, transformers_greedy
from mesh_helpers import get_load, wait_idle, wait_until
from model_factory import make_tiny_tokenizer

from engine.core.core_request import CoreRequest
from engine.core.loop import AddRequests
from engine.core.outputs import RequestOutput
from engine.core.request import FinishReason, Request
from engine.errors import ErrorKind, InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.structured.constraint import OutputConstraint
from protoserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc


def test_a_request_crosses_to_the_core_as_one_plain_message() -> None:
    request = CoreRequest("r-1", (5, 6, 7), SamplingParams(temperature=0.5, max_tokens=9, seed=3),
                          max_tokens=9, eos_token_ids=frozenset({1}), priority=2, cache_salt="t",
                          deadline=123.5, constraint=OutputConstraint(regex="[ab]+"))
    (copy,) = pickle.loads(pickle.dumps(AddRequests([request]))).requests
    assert copy == request
    # The core builds its own Request from it (its matcher from the core's compiler).
    built = Request.from_core(copy, grammar=None)
    assert built.prompt_token_ids == built.all_token_ids == [5, 6, 7]
    for name in ("request_id", "sampling_params", "max_tokens", "eos_token_ids", "priority",
                 "cache_salt", "arrival_time", "deadline", "pooling_params"):
        assert getattr(built, name) == getattr(request, name), name
    assert built.grammar is None and built.first_scheduled_time is None


def test_what_the_core_refuses_crosses_back_as_the_typed_error() -> None:
    error = InvalidRequestError("invalid regex: unclosed group", field="constraint.regex")
    output = RequestOutput("r-1", [], FinishReason.ABORT, error=error)
    copy = pickle.loads(pickle.dumps(output)).error
    assert type(copy) is InvalidRequestError
    assert (copy.message, copy.field, copy.reason, copy.kind) == (
        error.message, "constraint.regex", "INVALID_ARGUMENT", ErrorKind.INVALID_ARGUMENT)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_peaked_model(tmp_path_factory.mktemp("peaked-llama"), "llama")
    make_tiny_tokenizer().save_pretrained(path)
    return path


CORE_MODES = ("process", "thread")


@pytest.fixture(scope="module")
@starts_servers
def servers(model_dir: Path) -> Iterator[dict[str, EngineProcess]]:
    """One server per core mode, started side by side."""
    started = start_side_by_side([
        partial(start_engine, model_dir, "--engine-core", mode, "--max-num-seqs", "8")
        for mode in CORE_MODES])
    yield dict(zip(CORE_MODES, started, strict=True))
    stop_side_by_side(started)


@pytest.fixture(scope="module", params=CORE_MODES)
def served(request: pytest.FixtureRequest, servers: dict[str, EngineProcess]) -> EngineProcess:
    return servers[request.param]


def _stream_tokens(stub: inference_pb2_grpc.InferenceStub, prompt: list[int]) -> list[int]:
    request = inference_pb2.GenerateRequest(
        token_ids=common_pb2.TokenIds(ids=prompt), return_text=False,
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS,
                                           ignore_eos=True),
    )
    tokens: list[int] = []
    for event in stub.Generate(request, timeout=120):
        if event.HasField("delta"):
            tokens.extend(event.delta.token_ids)
    return tokens


PROMPTS = prompts_from(11, [3, 17, 40, 9, 64, 25, 5, 33, 12, 50])


@pytest.fixture(scope="module")
def expected(model_dir: Path) -> list[list[int]]:
    """transformers' greedy tokens for PROMPTS (once for both core modes)."""
    return transformers_greedy(model_dir, PROMPTS)


def test_concurrent_streams_match_transformers(served: EngineProcess, expected) -> None:
    prompts = PROMPTS
    results: list[list[int] | None] = [None] * len(prompts)
    with grpc.insecure_channel(served.grpc_address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        def run(i: int) -> None:
            results[i] = _stream_tokens(stub, prompts[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        load = wait_idle(channel)
    assert results == expected
    assert load.num_kv_blocks > 0


def test_load_numbers_follow_a_running_request(served: EngineProcess) -> None:
    request = inference_pb2.GenerateRequest(
        token_ids=common_pb2.TokenIds(ids=[3] * 40), return_text=False,
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True),
    )
    with grpc.insecure_channel(served.grpc_address) as channel:
        total = wait_idle(channel).num_kv_blocks
        call = inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=120)
        next(call)  # started: the request is admitted
        wait_until(lambda: get_load(channel).num_free_kv_blocks < total, 10,
                   "the running request holds KV blocks in GetLoad")
        assert get_load(channel).num_requests_running == 1
        call.cancel()
        load = wait_idle(channel)
    assert load.num_free_kv_blocks == total


def _is_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # exited; reaped by whoever adopted it, or not


# The process-mode server of the tests above, killed last: pytest runs every test of one
# `served` parameter together, in file order, so this one (defined last) ends that group.
@pytest.mark.parametrize("served", ["process"], indirect=True)
def test_the_core_process_exits_with_its_server(served: EngineProcess) -> None:
    cores = core_process_pids(served.process.pid)
    assert len(cores) == 1
    # SIGKILL: the server gets no chance to stop its core; the core notices by itself.
    os.kill(served.process.pid, signal.SIGKILL)
    served.process.wait(10)
    wait_until(lambda: _is_gone(cores[0]), 20, "the core process exited after its server")
