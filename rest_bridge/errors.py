"""One table from gRPC status to HTTP status to OpenAI error type, and the error envelope.

Every error the bridge answers goes through `BridgeError` and `error_envelope`, so clients see
one shape: `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StatusMapping:
    http_status: int
    error_type: str


# The single source of truth for status translation; anything absent maps to 500.
GRPC_TO_HTTP: dict[grpc.StatusCode, StatusMapping] = {
    grpc.StatusCode.INVALID_ARGUMENT: StatusMapping(400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: StatusMapping(400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: StatusMapping(400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: StatusMapping(401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: StatusMapping(403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: StatusMapping(404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: StatusMapping(409, "conflict_error"),
    grpc.StatusCode.ABORTED: StatusMapping(409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: StatusMapping(429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: StatusMapping(499, "cancelled_error"),
    grpc.StatusCode.UNIMPLEMENTED: StatusMapping(501, "not_implemented_error"),
    grpc.StatusCode.UNAVAILABLE: StatusMapping(503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: StatusMapping(504, "timeout_error"),
}
SERVER_ERROR = StatusMapping(500, "server_error")

# Error types for HTTP statuses the bridge produces itself (routing, auth, body parsing).
_HTTP_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled_error",
    501: "not_implemented_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


def mapping_for_grpc(code: grpc.StatusCode | None) -> StatusMapping:
    if code is None:
        return SERVER_ERROR
    return GRPC_TO_HTTP.get(code, SERVER_ERROR)


def error_type_for_http(http_status: int) -> str:
    if http_status >= 500 and http_status not in _HTTP_ERROR_TYPES:
        return SERVER_ERROR.error_type
    return _HTTP_ERROR_TYPES.get(http_status, "invalid_request_error")


class BridgeError(Exception):
    """An error answered to the client as the OpenAI envelope with `http_status`."""

    def __init__(
        self,
        message: str,
        *,
        http_status: int = 400,
        error_type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers
        self.http_status = http_status
        self.error_type = error_type or error_type_for_http(http_status)
        self.param = param
        self.code = code

    def envelope(self) -> dict[str, Any]:
        return error_envelope(self.message, self.error_type, param=self.param, code=self.code)


def invalid_request(message: str, *, param: str | None = None) -> BridgeError:
    """A 400 for rules the bridge owns (shapes the proto cannot express)."""
    return BridgeError(message, http_status=400, param=param)


def error_envelope(
    message: str, error_type: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def bridge_error_from_rpc(
    error: grpc.aio.AioRpcError, *, field_aliases: dict[str, str] | None = None
) -> BridgeError:
    """Translate an engine status into the envelope: the field violation names `param`
    (renamed through `field_aliases` when the OpenAI name differs from the proto one) and the
    ErrorInfo reason becomes `code`."""
    mapping = mapping_for_grpc(error.code())
    field, reason, retry_after = _rich_details(error)
    if field is not None and field_aliases:
        field = field_aliases.get(field, field)
    message = error.details() or (error.code().name if error.code() else "engine error")
    return BridgeError(
        message,
        http_status=mapping.http_status,
        error_type=mapping.error_type,
        param=field,
        code=reason,
        # google.rpc.RetryInfo (queue full, draining) becomes the HTTP retry hint.
        headers={"Retry-After": str(max(1, math.ceil(retry_after)))}
        if retry_after is not None else None,
    )


def _rich_details(
    error: grpc.aio.AioRpcError,
) -> tuple[str | None, str | None, float | None]:
    """The first BadRequest field violation, the ErrorInfo reason and the RetryInfo delay
    (seconds), when attached."""
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        # Code or message disagree with the trailer: trust the trailer's details anyway.
        status = _status_from_trailer(error)
    except DecodeError:
        logger.warning("ignoring unparsable grpc-status-details-bin trailer")
        return None, None, None
    if status is None:
        return None, None, None
    field: str | None = None
    reason: str | None = None
    retry_after: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR) and field is None:
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            if bad_request.field_violations:
                field = bad_request.field_violations[0].field or None
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) and reason is None:
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason or None
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR) and retry_after is None:
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    return field, reason, retry_after


def _status_from_trailer(error: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                logger.warning("ignoring unparsable grpc-status-details-bin trailer")
                return None
    return None
