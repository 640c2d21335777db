"""W3C trace context across the two hops (HTTP -> bridge -> gRPC -> engine), shared by both
processes.

Always on, without OpenTelemetry: a well-formed `traceparent` / `tracestate` travels as gRPC
metadata of the same names, so the engine's request log line carries the caller's trace id.

With `--otlp-traces-endpoint` (needs `pip install 'protoserve[otel]'`): each process exports
spans over OTLP; the bridge's span is a child of the caller's context and the engine's span a
child of the bridge's. OpenTelemetry is imported only then, so neither process needs it
installed otherwise.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

logger = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
TRACE_KEYS = (TRACEPARENT, TRACESTATE)

# version-traceid-parentid-flags, lowercase hex (W3C Trace Context, level 1).
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
# The spec asks propagators to keep at least 512 characters; longer lists are dropped.
_MAX_TRACESTATE = 512
_PROTOCOL_ENV = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"


class TracingSetupError(ValueError):
    """--otlp-traces-endpoint given, but the packages it needs are missing."""


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a valid `traceparent`, else None (invalid headers are ignored)."""
    if not traceparent:
        return None
    match = _TRACEPARENT.fullmatch(traceparent.strip())
    if match is None or match[1] == "ff":
        return None
    trace_id, span_id = match[2], match[3]
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return trace_id


def trace_headers(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The trace context among HTTP headers or gRPC metadata: `traceparent` when valid, and
    then `tracestate` when it is printable ASCII of bounded length. Nothing else passes."""
    found: dict[str, str] = {}
    for key, value in pairs:
        key = key.lower()
        if key in TRACE_KEYS and key not in found and isinstance(value, str):
            found[key] = value.strip()
    if trace_id_of(found.get(TRACEPARENT)) is None:
        return {}
    state = found.get(TRACESTATE)
    if state is not None and not (len(state) <= _MAX_TRACESTATE and state.isascii()
                                  and state.isprintable()):
        del found[TRACESTATE]
    return found


def check_tracing_available(endpoint: str | None) -> None:
    """Fail at start-up, in one line, when the endpoint is set but cannot be served."""
    if endpoint:
        _exporter_class()


def init_tracer(service_name: str, endpoint: str | None) -> Any | None:
    """A tracer exporting to the OTLP `endpoint` in batches, or None when no endpoint is set.
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL picks grpc (default) or http/protobuf, as in the
    reference server; the OTEL_BSP_* variables tune batching."""
    if not endpoint:
        return None
    exporter_class = _exporter_class()
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # A provider of our own, not the global one: an embedding application keeps its own.
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter_class(endpoint=endpoint)))
    logger.info("tracing: exporting spans of %s to %s", service_name, endpoint)
    return provider.get_tracer("protoserve")


def _exporter_class():
    protocol = os.environ.get(_PROTOCOL_ENV, "grpc")
    try:
        import opentelemetry.sdk.trace  # noqa: F401 - the SDK itself must be there too

        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        elif protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        else:
            raise TracingSetupError(
                f"{_PROTOCOL_ENV}={protocol!r}: use 'grpc' or 'http/protobuf'")
    except ImportError as missing:
        raise TracingSetupError(
            f"--otlp-traces-endpoint needs OpenTelemetry ({missing.name} is not installed): "
            "pip install 'protoserve[otel]'") from None
    return OTLPSpanExporter


def start_span(tracer: Any, name: str, carrier: Mapping[str, str], *, server: bool = True,
               attributes: Mapping[str, Any] | None = None) -> Any:
    """A span that is a child of the context in `carrier` (a root span when it has none)."""
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract(dict(carrier))
    kind = SpanKind.SERVER if server else SpanKind.INTERNAL
    return tracer.start_span(name, context=parent, kind=kind, attributes=attributes)


def inject(span: Any) -> dict[str, str]:
    """`traceparent` (and `tracestate`) naming `span` as the parent of the next hop."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def end_span(span: Any, attributes: Mapping[str, Any], error: str | None = None) -> None:
    """Set the final attributes, mark an error status when `error`, and end `span`."""
    from opentelemetry.trace import Status, StatusCode

    span.set_attributes({k: v for k, v in attributes.items() if v is not None})
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()


def span_trace_id(span: Any) -> str:
    """The 32-hex-digit trace id of `span` (for log lines)."""
    return format(span.get_span_context().trace_id, "032x")
