"""Engine errors -> gRPC status codes with google.rpc details (ErrorInfo, BadRequest,
RequestInfo), so clients in any language get the reason and the offending field."""
from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from engine.errors import EngineError, ErrorKind

DOMAIN = "protoserve.dev"

_KIND_TO_CODE = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.UNIMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_rpc_status(
    code: grpc.StatusCode,
    message: str,
    *,
    reason: str,
    field: str | None = None,
    request_id: str | None = None,
    retry_after_s: float | None = None,
) -> grpc.Status:
    details = [_pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))]
    if retry_after_s is not None:
        # google.rpc.RetryInfo: gRPC clients back off by it; the bridge sends Retry-After.
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(retry_after_s * 1e9))
        details.append(_pack(retry))
    if field is not None:
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    if request_id:
        details.append(_pack(error_details_pb2.RequestInfo(request_id=request_id)))
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name), message=message, details=details
    )
    return rpc_status.to_status(status)


def engine_error_status(error: EngineError, request_id: str | None = None) -> grpc.Status:
    return to_rpc_status(
        _KIND_TO_CODE[error.kind],
        error.message,
        reason=error.reason,
        field=error.field,
        request_id=request_id,
        retry_after_s=getattr(error, "retry_after_s", None),
    )


async def abort_with(context: grpc.aio.ServicerContext, status: grpc.Status) -> None:
    """End the RPC with a rich status (code, message and details trailer)."""
    await context.abort_with_status(status)
