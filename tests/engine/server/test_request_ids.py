"""Client input that the engine echoes back (request ids into response metadata, names into
error messages) is validated or shortened: a bad id is INVALID_ARGUMENT naming its field, a
huge echoed value still gives the real status, never INTERNAL or a metadata-size error."""
from __future__ import annotations

from collections.abc import Callable, Iterator

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
