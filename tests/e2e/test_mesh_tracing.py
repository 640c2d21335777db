"""W3C trace context through both hops, on real processes (engine-serve --role all: engine +
bridge child) over 127.0.0.1: an HTTP `traceparent` reaches the engine's request log line
without OpenTelemetry configured; with --otlp-traces-endpoint, both processes export spans
to a collector run here (OTLP over gRPC), the bridge's span a child of the caller's and the
engine's span a child of the bridge's."""
from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
from engine_process import EngineProcess, start_engine
from mesh_helpers import wait_until

BOUND_S = 30.0  # generous: span batches and log lines on a shared 2-core machine


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def _complete(url: str, request_id: str, headers: dict[str, str], max_tokens: int = 3) -> None:
    reply = httpx.post(f"{url}/v1/completions", timeout=60,
                       headers={"x-request-id": request_id, **headers},
                       json={"prompt": "hello there", "max_tokens": max_tokens,
                             "temperature": 0, "ignore_eos": True})
    assert reply.status_code == 200, reply.text


def _request_lines(log_path: Path) -> dict[str, dict]:
    """The engine's structured request log lines, by request id."""
    lines = {}
    for text in log_path.read_text(errors="replace").splitlines():
        head, sep, payload = text.partition(" engine.requests: request ")
        if sep:
            entry = json.loads(payload)
            lines[entry["request_id"]] = entry
    return lines


@pytest.fixture(scope="module")
def plain(tiny_llama_dir: Path, tmp_path_factory) -> Iterator[tuple[EngineProcess, Path]]:
    log_path = tmp_path_factory.mktemp("plain-log") / "engine-serve.log"
    handle = start_engine(tiny_llama_dir, "--log-level", "info", role="all",
                          log_path=log_path)
    yield handle, log_path
    handle.stop()


def test_traceparent_reaches_the_engine_request_log(plain) -> None:
    handle, log_path = plain
    header, trace_id, _ = _traceparent()
    _complete(handle.http_url, "traced-plain", {"traceparent": header,
                                                 "tracestate": "vendor=opaque"})
    # Malformed or absent: served as usual, logged without a trace id.
    _complete(handle.http_url, "traced-bad", {"traceparent": "00-not-a-trace-01"})
    _complete(handle.http_url, "traced-none", {})
    wait_until(lambda: {"traced-plain", "traced-bad", "traced-none"} <= set(
        _request_lines(log_path)), BOUND_S, "three request log lines")
    lines = _request_lines(log_path)
    assert lines["traced-plain"]["trace_id"] == trace_id
    assert lines["traced-plain"]["finish_reason"] == "length"
    assert "trace_id" not in lines["traced-bad"] and "trace_id" not in lines["traced-none"]


# ----- with OpenTelemetry: spans exported to a collector run by the test --------------------


class _Collector:
    """An OTLP/gRPC trace collector on 127.0.0.1: keeps (service name, span) pairs."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import (
            trace_service_pb2,
            trace_service_pb2_grpc,
        )

        self.spans: list[tuple[str, object]] = []
        lock = threading.Lock()
        spans = self.spans

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 - the generated name
                with lock:
                    for resource_spans in request.resource_spans:
                        service = _attributes(resource_spans.resource.attributes).get(
                            "service.name", "")
                        for scope in resource_spans.scope_spans:
                            spans.extend((service, span) for span in scope.spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def find(self, service: str, trace_id: str) -> list:
        return [span for name, span in list(self.spans)
                if name == service and span.trace_id.hex() == trace_id]


def _attributes(pairs) -> dict:
    values = {}
    for pair in pairs:
        value = pair.value
        kind = value.WhichOneof("value")
        if kind == "array_value":
            values[pair.key] = [getattr(v, v.WhichOneof("value")) for v in value.array_value.values]
        else:
            values[pair.key] = getattr(value, kind) if kind else None
    return values


@pytest.fixture(scope="module")
def traced(tiny_llama_dir: Path, tmp_path_factory):
    pytest.importorskip("opentelemetry.sdk.trace", reason="the otel extra is not installed")
    pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
    collector = _Collector()
    log_path = tmp_path_factory.mktemp("traced-log") / "engine-serve.log"
    handle = start_engine(
        tiny_llama_dir, "--log-level", "info",
        "--otlp-traces-endpoint", f"http://127.0.0.1:{collector.port}",
        role="all", log_path=log_path,
        env={"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"})
    yield handle, collector, log_path
    handle.stop()
    collector.server.stop(0)


def test_spans_nest_caller_bridge_engine(traced) -> None:
    handle, collector, log_path = traced
    header, trace_id, caller_span = _traceparent()
    _complete(handle.http_url, "traced-otel", {"traceparent": header}, max_tokens=4)
    wait_until(lambda: collector.find("protoserve-engine", trace_id)
               and collector.find("protoserve-bridge", trace_id), BOUND_S,
               "the bridge's and the engine's spans reach the collector")
    [bridge] = collector.find("protoserve-bridge", trace_id)
    [engine] = collector.find("protoserve-engine", trace_id)
    assert bridge.parent_span_id.hex() == caller_span
    assert bridge.name == "POST /v1/completions"
    assert _attributes(bridge.attributes)["http.response.status_code"] == 200
    assert engine.parent_span_id == bridge.span_id
    assert engine.name == "protoserve.generate"
    attributes = _attributes(engine.attributes)
    assert attributes["gen_ai.request.id"] == "traced-otel"
    assert attributes["gen_ai.usage.completion_tokens"] == 4
    assert attributes["gen_ai.usage.prompt_tokens"] > 0
    assert attributes["gen_ai.response.finish_reasons"] == ["length"]
    # The engine's span lies within the bridge's.
    assert bridge.start_time_unix_nano <= engine.start_time_unix_nano
    assert engine.end_time_unix_nano <= bridge.end_time_unix_nano
    wait_until(lambda: "traced-otel" in _request_lines(log_path), BOUND_S, "the log line")
    assert _request_lines(log_path)["traced-otel"]["trace_id"] == trace_id


def test_a_request_without_trace_context_starts_a_trace_at_the_bridge(traced) -> None:
    handle, collector, log_path = traced
    _complete(handle.http_url, "untraced-otel", {})
    wait_until(lambda: "untraced-otel" in _request_lines(log_path), BOUND_S, "the log line")
    trace_id = _request_lines(log_path)["untraced-otel"]["trace_id"]
    wait_until(lambda: collector.find("protoserve-engine", trace_id)
               and collector.find("protoserve-bridge", trace_id), BOUND_S, "both spans")
    [bridge] = collector.find("protoserve-bridge", trace_id)
    [engine] = collector.find("protoserve-engine", trace_id)
    assert bridge.parent_span_id == b"" and engine.parent_span_id == bridge.span_id
