"""One structured log line and one metrics record per request; prompts only within
--max-log-len; rejected requests add no latency sample; the latency split at the first
scheduling and the first token."""
from __future__ import annotations

import json
import logging
import time

import pytest

from engine.generation import GenerationDelta, GenerationFinished, GenerationStarted
from engine.core.request import FinishReason
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


def test_latency_split_at_first_scheduling_and_first_token(caplog) -> None:
    """queue + inference = the span up to the last Finished event; prefill + decode =
    inference; every per-request histogram gets one sample."""
    metrics = ServingMetrics("m", request_phases=True)
    caplog.set_level(logging.INFO, logger="engine.requests")
    tracker = RequestTracker("r1", metrics, ServingOptions(), n=2, trace_id="ab" * 16)
    tracker.on_event(GenerationStarted("r1", [1, 2, 3], "abc", 0,
                                       scheduled_at=time.monotonic(), max_tokens=7))
    tracker.on_event(GenerationDelta(0, [7], "x"))
    tracker.on_event(GenerationFinished(0, FinishReason.LENGTH, 1))
    tracker.finish()
    samples = _samples(metrics)
    for name in ("request_queue_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_inference_time_seconds",
                 "request_prompt_tokens", "request_generation_tokens", "request_params_n",
                 "request_params_max_tokens", "e2e_request_latency_seconds"):
        assert samples[f"protoserve:{name}_count"] == 1.0, name
    assert samples["protoserve:request_params_n_sum"] == 2.0
    assert samples["protoserve:request_params_max_tokens_sum"] == 7.0
    assert samples["protoserve:request_prompt_tokens_sum"] == 3.0
    phases = samples["protoserve:request_prefill_time_seconds_sum"] + samples[
        "protoserve:request_decode_time_seconds_sum"]
    assert phases == pytest.approx(samples["protoserve:request_inference_time_seconds_sum"])
    split = samples["protoserve:request_queue_time_seconds_sum"] + samples[
        "protoserve:request_inference_time_seconds_sum"]
    assert split <= samples["protoserve:e2e_request_latency_seconds_sum"]
    [line] = _lines(caplog)
    assert line["trace_id"] == "ab" * 16 and line["queue_s"] is not None


def test_a_request_never_scheduled_has_no_phase_samples() -> None:
    metrics = ServingMetrics("m", request_phases=True)
    RequestTracker("r1", metrics, ServingOptions(log_requests=False)).finish("deadline")
    samples = _samples(metrics)
    assert samples["protoserve:e2e_request_latency_seconds_count"] == 1.0
    assert samples["protoserve:request_queue_time_seconds_count"] == 0.0
    # The bridge (request_phases=False) does not export the split at all.
    assert not any("queue_time" in k for k in _samples(ServingMetrics("m")))


def _samples(metrics: ServingMetrics) -> dict[str, float]:
    samples = {}
    for line in metrics.render().decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key.partition("{")[0] if "_bucket" not in key else key] = float(value)
    return samples


def test_one_inter_token_sample_per_token_gap_and_choice() -> None:
    """time_per_output_token counts each gap between a choice's tokens (tokens - 1 per
    choice), as the reference does, not one mean per request."""
    metrics = ServingMetrics("m")
    tracker = RequestTracker("r1", metrics, ServingOptions(log_requests=False), n=2, best_of=3)
    tracker.on_event(GenerationStarted("r1", [1, 2, 3], "abc", 0))
    for step in range(4):
        for index in (0, 1):
            if index == 0 or step < 2:
                tracker.on_event(GenerationDelta(index, [7 + step], "x"))
    tracker.on_event(GenerationFinished(0, FinishReason.LENGTH, 4))
    tracker.on_event(GenerationFinished(1, FinishReason.STOP, 2))
    tracker.finish()
    samples = _samples(metrics)
    assert samples["protoserve:time_per_output_token_seconds_count"] == (4 - 1) + (2 - 1)
    assert samples["protoserve:request_time_per_output_token_seconds_count"] == 1.0
    assert samples["protoserve:request_params_best_of_sum"] == 3.0
    assert samples["protoserve:request_max_num_generation_tokens_sum"] == 4.0
