"""Client input is bounded before it costs anything, and what the engine echoes back is
validated or shortened.

- Request ids go into response metadata: a bad id is INVALID_ARGUMENT naming its field; a
  huge echoed value (a model name) still gives the real status, never INTERNAL or a
  metadata-size error.
- The number of choices (n, best_of) is capped by --max-n (128), and the prompt's size in
  bytes before tokenizing (32 bytes per token of context unless --max-prompt-bytes): one
  request can no longer grow the server until the OOM killer ends it."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx

import grpc
import pytest
from engine_process import EngineProcess
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from protoserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc


@pytest.fixture(scope="module")
def stub(shared_server: Callable[..., EngineProcess]) -> Iterator[inference_pb2_grpc.InferenceStub]:
    engine = shared_server("--max-model-len", "256")  # the same server as test_grpc_server.py
    with grpc.insecure_channel(engine.grpc_address) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


def _field_violations(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status details"
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


def _request(**kwargs) -> inference_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=2)
    return inference_pb2.GenerateRequest(text="hello", sampling=sampling, **kwargs)


@pytest.mark.parametrize("request_id", ["caf\u00e9", "a\tb", "line\nbreak", "x" * 16384, "\x7f"])
def test_bad_body_request_id_is_invalid_argument(
    stub: inference_pb2_grpc.InferenceStub, request_id: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(_request(request_id=request_id), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert _field_violations(caught.value) == ["request_id"]
    with pytest.raises(grpc.RpcError) as caught:
        stub.Embed(inference_pb2.EmbedRequest(request_id=request_id, inputs=[
            inference_pb2.EmbedInput(text="hi")]), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert _field_violations(caught.value) == ["request_id"]


def test_too_long_metadata_request_id_names_the_header(
    stub: inference_pb2_grpc.InferenceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(_request(), metadata=(("x-request-id", "m" * 1000),), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _field_violations(caught.value) == ["x-request-id"]


def test_good_ids_still_echo(stub: inference_pb2_grpc.InferenceStub) -> None:
    request_id = "req-" + "0123456789" * 20 + " ~!"  # printable, under the limit
    call = stub.Generate(_request(request_id=request_id), timeout=30)
    assert [e.WhichOneof("event") for e in call][-1] == "usage"
    assert ("x-request-id", request_id) in call.initial_metadata()


def test_huge_unknown_model_name_is_not_found_with_a_short_message(
    stub: inference_pb2_grpc.InferenceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(_request(model="m" * 10_000), timeout=30))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()
    assert len(caught.value.details()) < 1100
    assert _field_violations(caught.value) == ["model"]


@pytest.mark.parametrize("field", ["n", "best_of"])
def test_choices_beyond_max_n_are_refused(stub: inference_pb2_grpc.InferenceStub,
                                          field: str) -> None:
    request = _request()
    setattr(request.sampling, field, 129)
    request.sampling.temperature = 1.0
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(request, timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _field_violations(caught.value) == [field] and "--max-n" in caught.value.details()


def test_prompt_over_the_byte_bound_is_refused_before_tokenizing(
    stub: inference_pb2_grpc.InferenceStub,
) -> None:
    # --max-model-len 256: 32 x 256 = 8192 bytes.
    for request in (inference_pb2.GenerateRequest(text="a" * 8193),
                    inference_pb2.GenerateRequest(chat=common_pb2.ChatInput(messages=[
                        common_pb2.ChatMessage(role="user", text="b" * 9000)]))):
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(request, timeout=30))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _field_violations(caught.value) == ["prompt"]
    with pytest.raises(grpc.RpcError) as caught:
        stub.Embed(inference_pb2.EmbedRequest(inputs=[inference_pb2.EmbedInput(text="c" * 9000)]),
                   timeout=30)
    assert _field_violations(caught.value) == ["inputs"]
    # Within the bound the request runs (the context-length check is the tokenizer's).
    assert list(stub.Generate(_request(), timeout=30))[-1].WhichOneof("event") == "usage"


def test_the_bridge_refuses_a_huge_n_with_400(
    shared_server: Callable[..., EngineProcess],
) -> None:
    """The request that once grew the server to 16 GB: now a 400 naming n."""
    server = shared_server(role="all")
    body = {"prompt": "hi", "n": 6818742, "max_tokens": 1, "temperature": 1}
    response = httpx.post(f"{server.http_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "n"
    ok = httpx.post(f"{server.http_url}/v1/completions", timeout=60,
                    json={"prompt": "hi", "n": 2, "max_tokens": 2, "temperature": 1})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
