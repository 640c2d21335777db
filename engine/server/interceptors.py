"""Server interceptors.

UndecodableRequestInterceptor: grpcio answers INTERNAL ("Exception deserializing request")
when a request does not parse, e.g. a string field holding invalid UTF-8. That is the
client's fault, so we answer INVALID_ARGUMENT naming the problem instead: the deserializer is
wrapped to return a marker, and the handler is wrapped to reject the marker.
"""
from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from engine.server.status import to_rpc_status


class _Undecodable:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            return _Undecodable(str(exc) or type(exc).__name__)

    return deserialize


def _status(marker: _Undecodable) -> grpc.Status:
    return to_rpc_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the request message could not be parsed (invalid protobuf or invalid UTF-8 in a "
        f"string field): {marker.reason}",
        reason="MALFORMED_REQUEST",
    )


def _guard_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            await context.abort_with_status(_status(request))
        return await behavior(request, context)

    return handle


def _guard_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(behavior):
        # Coroutine-style streaming handlers (context.write), e.g. health Watch.
        return _guard_unary(behavior)

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            await context.abort_with_status(_status(request))
        async for response in behavior(request, context):
            yield response

    return handle


class UndecodableRequestInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        deserializer = _tolerant(handler.request_deserializer)
        if handler.unary_unary is not None:
            return handler._replace(
                request_deserializer=deserializer, unary_unary=_guard_unary(handler.unary_unary)
            )
        if handler.unary_stream is not None:
            return handler._replace(
                request_deserializer=deserializer, unary_stream=_guard_stream(handler.unary_stream)
            )
        return handler
