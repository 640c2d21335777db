"""Hypothesis-generated GenerateRequest messages (every field, wild values) against a real
engine: each call ends OK or with a client-error status, never INTERNAL/UNKNOWN, and the server
stays SERVING with every KV block back in the pool. Raw undecodable bytes likewise."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import pytest
from engine_process import EngineProcess
from fuzz_budget import examples
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mesh_helpers import wait_idle

from protoserve.v1 import inference_pb2, inference_pb2_grpc

hypothesis = pytest.importorskip("hypothesis", reason="pip install hypothesis (the test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.fuzz


CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_INTS = st.one_of(st.integers(-3, 40), st.sampled_from([-(2**31), 2**31 - 1, 0, 1, 255]))
_FLOATS = st.one_of(st.floats(width=32), st.floats(-3, 3, width=32))
_TEXT = st.text(max_size=24)


def _scalar(field: FieldDescriptor) -> st.SearchStrategy:
    cpp = field.cpp_type
    if cpp in (FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64):
        return _INTS
    if cpp in (FieldDescriptor.CPPTYPE_UINT32, FieldDescriptor.CPPTYPE_UINT64):
        return st.integers(0, 300)
    if cpp in (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE):
        return _FLOATS
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        return st.booleans()
    if cpp == FieldDescriptor.CPPTYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values] + [99])
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=16)
    return _TEXT


def _fields(descriptor: Descriptor, depth: int) -> st.SearchStrategy[dict]:
    optional = {}
    for field in descriptor.fields:
        message = field.message_type
        if message is not None and message.GetOptions().map_entry:
            key, value = message.fields_by_name["key"], message.fields_by_name["value"]
            optional[field.name] = st.dictionaries(_scalar(key), _scalar(value), max_size=3)
        elif message is not None:
            if depth >= 3 or message.full_name.startswith("google.protobuf"):
                continue
            sub = _fields(message, depth + 1)
            optional[field.name] = st.lists(sub, max_size=3) if _repeated(field) else sub
        else:
            optional[field.name] = (st.lists(_scalar(field), max_size=4) if _repeated(field)
                                    else _scalar(field))
    return st.fixed_dictionaries({}, optional=optional)


def _repeated(field: FieldDescriptor) -> bool:
    return field.is_repeated


def _fill(message, values: dict) -> None:
    for name, value in values.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name) if (_repeated(field) or field.message_type) else None
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            target.update(value)
        elif field.message_type is not None and _repeated(field):
            for item in value:
                _fill(target.add(), item)
        elif field.message_type is not None:
            _fill(target, value)
        elif _repeated(field):
            target.extend(value)
        else:
            setattr(message, name, value)


def _bounded(request: inference_pb2.GenerateRequest) -> inference_pb2.GenerateRequest:
    """Wild values stay, but the work one example can cause stays small."""
    sampling = request.sampling
    for name, cap in (("max_tokens", 6), ("n", 3), ("best_of", 3), ("min_tokens", 6)):
        if sampling.HasField(name) and getattr(sampling, name) > cap:
            setattr(sampling, name, cap)
    request.request_id = ""  # concurrent examples must not collide on ids
    return request


@pytest.fixture(scope="module")
def engine(shared_server: Callable[..., EngineProcess]) -> EngineProcess:
    # Shared with test_grpc_server.py (same flags): fuzzing must
    # leave it serving and idle, which the tests here check.
    return shared_server("--max-model-len", "256")


@pytest.fixture(scope="module")
def channel(engine: EngineProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(engine.grpc_address) as ch:
        yield ch


def _assert_serving(channel: grpc.Channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="protoserve.v1.Inference"), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@settings(max_examples=examples(60), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(values=_fields(inference_pb2.GenerateRequest.DESCRIPTOR, 0))
def test_generated_requests_never_cause_internal_errors(channel: grpc.Channel, values) -> None:
    request = inference_pb2.GenerateRequest()
    _fill(request, values)
    request = _bounded(request)
    try:
        list(inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60))
    except grpc.RpcError as error:
        assert error.code() in CLIENT_ERRORS, (error.code(), error.details(), request)
    _assert_serving(channel)


@settings(max_examples=examples(25), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=64))
def test_raw_bytes_are_rejected_cleanly(channel: grpc.Channel, payload: bytes) -> None:
    call = channel.unary_stream("/protoserve.v1.Inference/Generate",
                                request_serializer=None, response_deserializer=None)
    try:
        for _ in call(payload, timeout=60):
            pass
    except grpc.RpcError as error:
        assert error.code() in CLIENT_ERRORS, (error.code(), error.details(), payload)
    _assert_serving(channel)


def test_server_is_idle_after_fuzzing(channel: grpc.Channel) -> None:
    wait_idle(channel, 30)
