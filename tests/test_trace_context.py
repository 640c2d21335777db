"""Which trace headers pass from HTTP to gRPC metadata (protoserve/tracing.py): a valid W3C
`traceparent`, and `tracestate` only beside it; anything malformed is dropped, never sent on
(gRPC rejects metadata values that are not printable ASCII)."""
from __future__ import annotations

import pytest

from protoserve.tracing import trace_headers, trace_id_of

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
VALID = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("header", "trace_id"),
    [
        (VALID, TRACE_ID),
        (f" {VALID} ", TRACE_ID),
        (f"00-{TRACE_ID.upper()}-00f067aa0ba902b7-01", None),  # uppercase hex is invalid
        (f"ff-{TRACE_ID}-00f067aa0ba902b7-01", None),  # version ff is forbidden
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", None),  # all-zero trace id
        (f"00-{TRACE_ID}-{'0' * 16}-01", None),  # all-zero parent id
        (f"00-{TRACE_ID}-00f067aa0ba902b7", None),
        ("", None),
        (None, None),
    ],
)
def test_trace_id_of(header: str | None, trace_id: str | None) -> None:
    assert trace_id_of(header) == trace_id


def test_only_the_trace_context_passes() -> None:
    pairs = [("Traceparent", VALID), ("TraceState", "vendor=opaque"), ("x-other", "1"),
             ("traceparent", "00-second-ignored")]
    assert trace_headers(pairs) == {"traceparent": VALID, "tracestate": "vendor=opaque"}


def test_tracestate_without_a_valid_traceparent_is_dropped() -> None:
    assert trace_headers([("tracestate", "vendor=opaque")]) == {}
    assert trace_headers([("traceparent", "garbage"), ("tracestate", "a=b")]) == {}


@pytest.mark.parametrize("state", ["v=\u00e9", "v=a\x01b", "v=" + "a" * 600])
def test_unsendable_tracestate_is_dropped_but_traceparent_kept(state: str) -> None:
    assert trace_headers([("traceparent", VALID), ("tracestate", state)]) == {
        "traceparent": VALID}
