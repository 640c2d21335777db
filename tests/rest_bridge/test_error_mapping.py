"""The one gRPC -> HTTP -> OpenAI error table, the envelope, and pydantic error naming."""
from __future__ import annotations

import grpc
import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from rest_bridge.error_handlers import describe_validation_errors
from rest_bridge.errors import (
    GRPC_TO_HTTP,
    BridgeError,
    bridge_error_from_rpc,
    error_envelope,
    mapping_for_grpc,
)

EXPECTED_TABLE = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "OUT_OF_RANGE": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "ALREADY_EXISTS": (409, "conflict_error"),
    "ABORTED": (409, "conflict_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "CANCELLED": (499, "cancelled_error"),
    "UNIMPLEMENTED": (501, "not_implemented_error"),
    "UNAVAILABLE": (503, "service_unavailable_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
    "INTERNAL": (500, "server_error"),
    "UNKNOWN": (500, "server_error"),
    "DATA_LOSS": (500, "server_error"),
}


@pytest.mark.parametrize("code_name", sorted(EXPECTED_TABLE))
def test_status_table(code_name: str) -> None:
    mapping = mapping_for_grpc(grpc.StatusCode[code_name])
    assert (mapping.http_status, mapping.error_type) == EXPECTED_TABLE[code_name]


def test_table_covers_every_status_code_but_ok() -> None:
    mapped = {code.name for code in GRPC_TO_HTTP} | {"INTERNAL", "UNKNOWN", "DATA_LOSS", "OK"}
    assert mapped == {code.name for code in grpc.StatusCode}


def rpc_error(code: grpc.StatusCode, message: str, *details: Message,
              trailer: bytes | None = None) -> grpc.aio.AioRpcError:
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=packed)
    value = status.SerializeToString() if trailer is None else trailer
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", value))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=message)


def bad_request(field: str) -> error_details_pb2.BadRequest:
    violation = error_details_pb2.BadRequest.FieldViolation(field=field, description="bad")
    return error_details_pb2.BadRequest(field_violations=[violation])


def test_rich_details_name_the_field_and_reason() -> None:
    error = bridge_error_from_rpc(rpc_error(
        grpc.StatusCode.INVALID_ARGUMENT, "temperature must be >= 0",
        error_details_pb2.ErrorInfo(reason="INVALID_SAMPLING_PARAM", domain="d"),
        bad_request("temperature"),
    ))
    assert error.http_status == 400
    assert error.envelope() == {"error": {
        "message": "temperature must be >= 0", "type": "invalid_request_error",
        "param": "temperature", "code": "INVALID_SAMPLING_PARAM"}}


def test_field_aliases_rename_proto_fields_to_what_the_client_sent() -> None:
    error = bridge_error_from_rpc(
        rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "bad", bad_request("logprobs")),
        field_aliases={"logprobs": "top_logprobs"},
    )
    assert error.param == "top_logprobs"


def test_status_without_details_and_with_a_corrupt_trailer() -> None:
    plain = grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(),
                                 grpc.aio.Metadata(), details="full")
    error = bridge_error_from_rpc(plain)
    assert (error.http_status, error.error_type, error.param, error.code) == (
        429, "rate_limit_error", None, None)
    assert error.message == "full"
    corrupt = bridge_error_from_rpc(
        rpc_error(grpc.StatusCode.NOT_FOUND, "no model", trailer=b"\xff\x00garbage"))
    assert (corrupt.http_status, corrupt.param) == (404, None)


def test_details_whose_message_differs_from_the_status_are_still_read() -> None:
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="other text")
    detail = any_pb2.Any()
    detail.Pack(bad_request("top_p"))
    status.details.append(detail)
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(),
        grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString())), details="top_p")
    assert bridge_error_from_rpc(error).param == "top_p"


def test_envelope_and_bridge_error_defaults() -> None:
    assert error_envelope("m", "t") == {"error": {"message": "m", "type": "t", "param": None,
                                                  "code": None}}
    assert BridgeError("x").error_type == "invalid_request_error"
    assert BridgeError("x", http_status=404).error_type == "not_found_error"
    assert BridgeError("x", http_status=502).error_type == "server_error"


def test_validation_errors_name_the_field_through_unions() -> None:
    union_errors = [
        {"type": "string_type", "loc": ("body", "messages", 0, "content", "str"), "msg": "a"},
        {"type": "list_type", "loc": ("body", "messages", 0, "content", "list[Part]"), "msg": "b"},
        {"type": "float_type", "loc": ("body", "temperature"), "msg": "c"},
    ]
    message, param = describe_validation_errors(union_errors)
    assert param == "messages.0.content"
    assert "messages.0.content.str: a" in message and "temperature: c" in message


def test_validation_error_kinds_without_a_field() -> None:
    message, param = describe_validation_errors(
        [{"type": "json_invalid", "loc": ("body", 3), "msg": "JSON decode error",
          "ctx": {"error": "Expecting value"}}])
    assert param is None and "not valid JSON" in message and "Expecting value" in message
    message, param = describe_validation_errors(
        [{"type": "model_attributes_type", "loc": ("body",), "msg": "x", "input": b"a=b"}])
    assert param is None and "application/json" in message
    _, param = describe_validation_errors(
        [{"type": "missing", "loc": ("body", "prompt"), "msg": "Field required"}])
    assert param == "prompt"
