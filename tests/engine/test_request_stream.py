"""The serving side's end of one choice (engine/frontend/request_stream.py): it learns what
it reports about the request (first admission, prefix-cache hit) from the core's outputs,
with no view of the core's Request, and a request the core refused fails before any event."""
from __future__ import annotations

import asyncio

from engine.core.outputs import RequestOutput
from engine.core.request import FinishReason
from engine.errors import InvalidRequestError
from engine.frontend.request_stream import RequestStream
from engine.generation import GenerationDelta, GenerationFinished
from engine.sampling_params import SamplingParams


def _stream() -> tuple[RequestStream, asyncio.Queue]:
    events: asyncio.Queue = asyncio.Queue()
    stream = RequestStream(0, "client-1", (5, 6, 7), SamplingParams(max_tokens=4), events,
                           tokenizer=None, return_text=False)
    return stream, events


def _drain(events: asyncio.Queue) -> list:
    return [events.get_nowait() for _ in range(events.qsize())]


def test_admission_and_cache_hit_come_from_the_first_admitted_output() -> None:
    stream, events = _stream()
    assert stream.first_scheduled_time is None and stream.num_cached_tokens == 0
    assert stream.on_output(RequestOutput("r", [11], num_cached_tokens=16,
                                          first_scheduled_time=5.0)) == (False, False)
    # Later outputs (after a preemption, say) do not move the first admission.
    assert stream.on_output(RequestOutput("r", [12], FinishReason.LENGTH, num_cached_tokens=32,
                                          first_scheduled_time=5.0)) == (True, False)
    assert (stream.first_scheduled_time, stream.num_cached_tokens) == (5.0, 16)
    delta, last, finished = _drain(events)
    assert isinstance(delta, GenerationDelta) and delta.token_ids == [11] and not delta.last
    assert isinstance(last, GenerationDelta) and last.last
    assert isinstance(finished, GenerationFinished) and finished.reason is FinishReason.LENGTH
    assert finished.num_output_tokens == 2


def test_a_refused_request_fails_with_the_core_error_before_any_event() -> None:
    stream, events = _stream()
    error = InvalidRequestError("invalid regex: unclosed group", field="constraint.regex")
    done = stream.on_output(RequestOutput("r", [], FinishReason.ABORT, error=error,
                                          finish_message="the output constraint failed"))
    assert done == (True, False)
    assert _drain(events) == [error]
