"""Engine errors -> gRPC status codes with google.rpc details (ErrorInfo, BadRequest,
RequestInfo), so clients in any language get the reason and the offending field."""
from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from engine.errors import EngineError, ErrorKind

DOMAIN = "protoserve.dev"
# The message travels twice in trailing metadata (grpc-message, and the details' Status and
# FieldViolation): an error that echoes a huge input (a 10 KB model name) must stay well
# inside the peer's metadata limit (8 KiB by default), or the client sees RESOURCE_EXHAUSTED
# instead of the real status.
MAX_MESSAGE_CHARS = 1024

_KIND_TO_CODE = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.UNIMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def shorten(text: str, limit: int) -> str:
    """`text`, or its head with the number of characters left out."""
    if len(text) <= limit:
        return text
    keep = max(limit - 40, 0)  # room for the note
    return f"{text[:keep]}... ({len(text) - keep} more characters)"


def to_rpc_status(
    code: grpc.StatusCode,
    message: str,
    *,
    reason: str,
    field: str | None = None,
    request_id: str | None = None,
    retry_after_s: float | None = None,
) -> grpc.Status:
    message = shorten(message, MAX_MESSAGE_CHARS)
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
