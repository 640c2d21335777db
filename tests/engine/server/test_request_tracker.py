"""One structured log line and one metrics record per request; prompts only within
--max-log-len; rejected requests add no latency sample."""
from __future__ import annotations

import json
import logging

import pytest

from engine.generation import GenerationDelta, GenerationFinished, GenerationStarted
from engine.request import FinishReason
from engine.server.request_tracker import RequestTracker, ServingOptions
from protoserve.serving_metrics import ServingMetrics


def _run(tracker: RequestTracker, outcome: str | None = None) -> None:
    tracker.on_event(GenerationStarted("r1", [1, 2, 3], "abc", 0))
    tracker.on_event(GenerationDelta(0, [7], "x"))
    tracker.on_event(GenerationDelta(0, [8], "y"))
    tracker.on_event(GenerationFinished(0, FinishReason.LENGTH, 2))
    tracker.finish(outcome)


def _lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [json.loads(r.getMessage().removeprefix("request "))
            for r in caplog.records if r.name == "engine.requests"]


def test_one_line_per_request_without_the_prompt(caplog: pytest.LogCaptureFixture) -> None:
    metrics = ServingMetrics("m")
    caplog.set_level(logging.INFO, logger="engine.requests")
    tracker = RequestTracker("r1", metrics, ServingOptions(), "secret prompt")
    _run(tracker)
    tracker.finish()  # idempotent
    [line] = _lines(caplog)
    assert line["request_id"] == "r1" and line["finish_reason"] == "length"
    assert line["prompt_tokens"] == 3 and line["output_tokens"] == 2
    assert line["ttft_s"] is not None and "prompt" not in line
    text = metrics.render().decode()
    assert 'protoserve:request_success_total{finished_reason="length",model_name="m"} 1.0' in text
    assert 'protoserve:generation_tokens_total{model_name="m"} 2.0' in text


def test_prompt_logged_only_up_to_max_log_len(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="engine.requests")
    _run(RequestTracker("r1", None, ServingOptions(max_log_len=6), "secret prompt"))
    assert _lines(caplog)[0]["prompt"] == "secret"


def test_disabled_logging_and_rejections(caplog: pytest.LogCaptureFixture) -> None:
    metrics = ServingMetrics("m")
    caplog.set_level(logging.INFO, logger="engine.requests")
    _run(RequestTracker("r1", metrics, ServingOptions(log_requests=False)))
    assert _lines(caplog) == []
    RequestTracker("r2", metrics, ServingOptions(log_requests=False)).finish("rejected")
    text = metrics.render().decode()
    assert 'protoserve:e2e_request_latency_seconds_count{model_name="m"} 1.0' in text


def test_cancel_and_deadline_are_counted_apart() -> None:
    metrics = ServingMetrics("m")
    _run(RequestTracker("a", metrics, ServingOptions(log_requests=False)), "cancelled")
    _run(RequestTracker("b", metrics, ServingOptions(log_requests=False)), "deadline")
    _run(RequestTracker("c", metrics, ServingOptions(log_requests=False)), "abort")
    text = metrics.render().decode()
    for reason in ("cancelled", "deadline", "abort"):
        assert f'protoserve:request_aborted_total{{model_name="m",reason="{reason}"}} 1.0' in text
