"""--max-request-memory: each request's host memory is estimated from its fields before it is
accepted, the requests in flight stay under the budget together, and every way a request ends
returns its share.

The servicer runs in this process over a real socket with the tiny Llama and the engine core on
a step thread (no child process), so the ledger can be read between calls. The REST side of the
same rules is tests/e2e/test_request_memory_budget.py."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from engine_process import free_port
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from mesh_helpers import wait_until

from engine.config import EngineConfig, ModelConfig
from engine.server.admission import (
    RequestCost,
    default_max_request_memory,
    embed_cost,
    generate_cost,
)
from engine.server.context import EngineHandle
from engine.server.grpc_server import EngineServer, GrpcServerConfig
from protoserve.v1 import admin_pb2, admin_pb2_grpc, common_pb2, inference_pb2, inference_pb2_grpc

MAX_MODEL_LEN = 512


@dataclass
class Served:
    handle: EngineHandle
    inference: inference_pb2_grpc.InferenceStub
    admin: admin_pb2_grpc.AdminStub

    def set_budget(self, num_bytes: int) -> None:
        # Read by the servicer at each request: a new budget applies to the next one.
        self.handle.options = replace(self.handle.options, max_request_memory=num_bytes)

    def cost(self, request: inference_pb2.GenerateRequest) -> RequestCost:
        return generate_cost(request, MAX_MODEL_LEN, 20)

    def wait_released(self) -> None:
        ledger = self.handle.request_memory
        wait_until(lambda: ledger.in_use == 0 and ledger.in_flight == 0, 30,
                   "the request-memory ledger back at zero")


@pytest.fixture(scope="module")
def served(tiny_llama_dir: Path) -> Iterator[Served]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(120)

    port = free_port()
    config = EngineConfig(model=ModelConfig(model=str(tiny_llama_dir),
                                            max_model_len=MAX_MODEL_LEN), engine_core="thread")

    async def make() -> EngineServer:  # grpc.aio binds a server to the loop it is made on
        return EngineServer(config, GrpcServerConfig("127.0.0.1", port))

    server = run(make())
    run(server.start())
    try:
        run(server.load_engine())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Served(server.handle, inference_pb2_grpc.InferenceStub(channel),
                         admin_pb2_grpc.AdminStub(channel))
    finally:
        run(server.stop(0))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.fixture
def budget(served: Served) -> Iterator[Callable[[int], None]]:
    default = served.handle.options.max_request_memory
    yield served.set_budget
    served.set_budget(default)


def _request(n: int = 1, max_tokens: int = 4, **fields) -> inference_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(temperature=1.0, seed=1, n=n, max_tokens=max_tokens,
                                         ignore_eos=True, **fields)
    return inference_pb2.GenerateRequest(text="hello there", sampling=sampling)


def _long(request_id: str = "", n: int = 1) -> inference_pb2.GenerateRequest:
    """Runs long enough to be ended from outside (the rest of the context), in few enough
    events that a reader in this process never falls behind the engine's per-request buffer
    (2048 events per choice: beyond it the request fails as a slow consumer)."""
    request = _request(n=n, max_tokens=MAX_MODEL_LEN - 8)
    request.request_id = request_id
    return request


def _details(error: grpc.RpcError) -> tuple[list[str], str | None, float | None]:
    """(field violations, ErrorInfo reason, RetryInfo seconds) of an error status."""
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status details"
    fields: list[str] = []
    reason = retry = None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry = info.retry_delay.ToNanoseconds() / 1e9
    return fields, reason, retry


def _choices_finished(events) -> int:
    return sum(1 for event in events if event.WhichOneof("event") == "finished")


def test_cost_grows_with_each_field_that_drives_it() -> None:
    base = generate_cost(_request(), MAX_MODEL_LEN, 20).total
    for bigger, field in ((_request(n=8), "n"), (_request(max_tokens=400), "max_tokens"),
                          (_request(logprobs=5), "logprobs"),
                          (_request(prompt_logprobs=5), "prompt_logprobs"),
                          (_request(n=1, best_of=8), "best_of"),
                          (_request(n=4, use_beam_search=True), "use_beam_search")):
        cost = generate_cost(bigger, MAX_MODEL_LEN, 20)
        assert cost.total > base, field
    # Each beam holds the prompt again: a beam search costs more than n sampled choices.
    assert generate_cost(_request(n=4, use_beam_search=True), MAX_MODEL_LEN, 20).total > \
        generate_cost(_request(n=4), MAX_MODEL_LEN, 20).total
    # Clamped to what the later checks accept, so those checks name the field themselves.
    huge = _request(max_tokens=10**9, logprobs=10**6)
    assert generate_cost(huge, MAX_MODEL_LEN, 20).total == \
        generate_cost(_request(max_tokens=MAX_MODEL_LEN, logprobs=20), MAX_MODEL_LEN, 20).total
    one = inference_pb2.EmbedRequest(inputs=[inference_pb2.EmbedInput(text="a b c")])
    four = inference_pb2.EmbedRequest(inputs=[inference_pb2.EmbedInput(text="a b c")] * 4)
    assert embed_cost(four, MAX_MODEL_LEN).total > embed_cost(one, MAX_MODEL_LEN).total


def test_success_holds_its_estimate_then_returns_it(served: Served) -> None:
    request = _long("budget-success")
    call = served.inference.Generate(request, timeout=120)
    assert next(call).WhichOneof("event") == "started"
    assert served.handle.request_memory.in_use == served.cost(request).total
    assert served.handle.request_memory.in_flight == 1
    assert _choices_finished(call) == 1
    served.wait_released()


@pytest.mark.parametrize("ending", ["client cancel", "engine abort"])
def test_a_request_ended_from_outside_returns_its_share(served: Served, ending: str) -> None:
    request = _long(f"budget-{ending.replace(' ', '-')}")
    call = served.inference.Generate(request, timeout=120)
    assert next(call).WhichOneof("event") == "started"
    assert served.handle.request_memory.in_use == served.cost(request).total
    if ending == "client cancel":
        call.cancel()
    else:
        reply = served.admin.Abort(admin_pb2.AbortRequest(request_ids=[request.request_id]),
                                   timeout=10)
        assert list(reply.aborted_request_ids) == [request.request_id]
        finished = [e.finished.reason for e in call if e.WhichOneof("event") == "finished"]
        assert finished and all(reason == inference_pb2.FINISH_REASON_ABORT for reason in finished)
    served.wait_released()


def test_a_deadline_returns_its_share(served: Served) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(served.inference.Generate(_long(), timeout=0.25))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    served.wait_released()


def test_an_engine_error_after_admission_returns_its_share(served: Served) -> None:
    # Admitted (the byte bound lets it through), then refused by tokenization: too long.
    request = inference_pb2.GenerateRequest(
        token_ids=common_pb2.TokenIds(ids=[7] * (MAX_MODEL_LEN + 1)),
        sampling=common_pb2.SamplingParams(max_tokens=4))
    with pytest.raises(grpc.RpcError) as caught:
        list(served.inference.Generate(request, timeout=60))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _details(caught.value)[1] == "CONTEXT_LENGTH_EXCEEDED"
    served.wait_released()


@pytest.mark.parametrize(("request_", "field"), [
    (_request(n=128, max_tokens=1), "n"),
    (_request(n=1, best_of=128, max_tokens=1), "best_of"),
    (_request(n=16, max_tokens=500), "max_tokens"),
    (_request(max_tokens=500, logprobs=20), "logprobs"),
    (inference_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=[7] * 500),
                                   sampling=common_pb2.SamplingParams(prompt_logprobs=20)),
     "prompt_logprobs"),
])
def test_a_request_over_the_whole_budget_is_refused_naming_its_field(
    served: Served, budget: Callable[[int], None], request_: inference_pb2.GenerateRequest,
    field: str,
) -> None:
    budget(200 * 1024)
    assert served.cost(request_).total > 200 * 1024
    with pytest.raises(grpc.RpcError) as caught:
        list(served.inference.Generate(request_, timeout=60))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert _details(caught.value)[0] == [field]
    assert "--max-request-memory" in caught.value.details()
    assert served.handle.request_memory.in_use == 0


def test_embeddings_over_the_whole_budget_are_refused_naming_inputs(
    served: Served, budget: Callable[[int], None]
) -> None:
    budget(16 * 1024)
    request = inference_pb2.EmbedRequest(inputs=[inference_pb2.EmbedInput(text="a b c")] * 8)
    with pytest.raises(grpc.RpcError) as caught:
        served.inference.Embed(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _details(caught.value)[0] == ["inputs"]
    assert served.handle.request_memory.in_use == 0


def test_an_admitted_embed_call_returns_its_share(served: Served) -> None:
    """Admitted under the default budget (a decoder embeds with last-token pooling)."""
    request = inference_pb2.EmbedRequest(inputs=[inference_pb2.EmbedInput(text="a b c")] * 4)
    reply = served.inference.Embed(request, timeout=60)
    assert len(reply.embeddings) == 4
    served.wait_released()


def test_concurrent_requests_over_the_budget_the_excess_is_refused(
    served: Served, budget: Callable[[int], None]
) -> None:
    """With no --max-queue-len it is the budget that refuses what does not fit now, with a
    retry hint, while the admitted requests complete. (The n=128 form of the original OOM is
    tests/e2e/test_request_memory_budget.py: in this process a reader of 128 choices falls
    behind the engine.)"""
    request = _long(n=2)
    cost = served.cost(request).total
    budget(cost * 5 // 2)  # room for two
    admitted = [served.inference.Generate(request, timeout=120) for _ in range(2)]
    for call in admitted:
        assert next(call).WhichOneof("event") == "started"
    assert served.handle.request_memory.in_use == 2 * cost

    def refused(_: int) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            list(served.inference.Generate(request, timeout=60))
        return caught.value

    with ThreadPoolExecutor(6) as pool:
        errors = list(pool.map(refused, range(6)))
    for error in errors:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        _, reason, retry = _details(error)
        assert reason == "MEMORY_BUDGET_FULL" and retry is not None and retry > 0
        assert "--max-request-memory" in error.details()
    assert [_choices_finished(call) for call in admitted] == [2, 2]
    served.wait_released()
    assert _choices_finished(served.inference.Generate(request, timeout=120)) == 2
    served.wait_released()


def test_the_flag_takes_a_size_and_refuses_a_non_positive_one_by_name(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from protoserve.cli.serve import build_parser

    parser = build_parser()
    assert parser.parse_args(["--max-request-memory", "512MiB"]).max_request_memory == 512 << 20
    assert parser.parse_args([]).max_request_memory is None  # default_max_request_memory()
    assert 0 < default_max_request_memory() <= 2 << 30
    for bad in ("0", "lots"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--max-request-memory", bad])
        assert "--max-request-memory" in capsys.readouterr().err
