"""Trace context from HTTP to the engine call (see protoserve/tracing.py).

The middleware picks `traceparent` / `tracestate` off each API request; every engine call made
while serving it sends them as gRPC metadata (a context variable carries them through the
route, its task groups and its streamed body). With a tracer it first starts the bridge's
span, a child of the caller's, and sends that span's context instead, so the engine's span
hangs below the bridge's.
"""
from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from protoserve.tracing import end_span, inject, start_span, trace_headers

_TRACED_PREFIXES = ("/v1", "/tokenize", "/detokenize")

_engine_metadata: ContextVar[tuple[tuple[str, str], ...]] = ContextVar(
    "protoserve_trace_metadata", default=()
)


def engine_trace_metadata() -> tuple[tuple[str, str], ...]:
    """The trace metadata for an engine call made on behalf of the current HTTP request."""
    return _engine_metadata.get()


class TraceContextMiddleware:
    """Pure ASGI (streamed bodies run inside it, so the span covers the whole response)."""

    def __init__(self, app: ASGIApp, *, tracer: Any | None) -> None:
        self.app = app
        self._tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(_TRACED_PREFIXES):
            await self.app(scope, receive, send)
            return
        incoming = trace_headers(Headers(scope=scope).items())
        if self._tracer is None:
            token = _engine_metadata.set(tuple(incoming.items()))
            try:
                await self.app(scope, receive, send)
            finally:
                _engine_metadata.reset(token)
            return
        method = scope.get("method", "")
        span = start_span(self._tracer, f"{method} {path}", incoming, attributes={
            "http.request.method": method, "url.path": path})
        status: list[int] = []

        async def send_noting_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        token = _engine_metadata.set(tuple(inject(span).items()))
        error: str | None = None
        try:
            await self.app(scope, receive, send_noting_status)
        except BaseException as exc:
            error = type(exc).__name__
            raise
        finally:
            _engine_metadata.reset(token)
            code = status[0] if status else None
            if error is None and code is not None and code >= 500:
                error = f"HTTP {code}"
            end_span(span, {"http.response.status_code": code,
                            "protoserve.request_id": scope.get("state", {}).get("request_id")},
                     error=error)
