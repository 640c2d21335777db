"""Service-mesh guarantees of the engine's gRPC server, each proven on a real engine process:
cancellation frees KV blocks, Admin/Abort is idempotent, deadlines evict and stop work,
back-pressure answers RESOURCE_EXHAUSTED with RetryInfo, metrics count cancels apart from
aborts, and readiness / drain / engine death behave as a load balancer needs."""
from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from engine_process import (
    EngineProcess,
    free_port,
    start_engine,
    start_for_selected_tests,
    starts_servers,
    stop_side_by_side,
)
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from mesh_helpers import (
    finished_reasons,
    get_load,
    long_request,
    open_stream,
    readiness,
    sample,
    scrape,
    seconds_until_unavailable,
    short_request,
    wait_idle,
    wait_until,
)

from protoserve.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

# Fault handling must be prompt ("within 2 s"); the bound is generous for a shared machine.
FAULT_BOUND_S = 10.0


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
@starts_servers
def servers(request: pytest.FixtureRequest, long_context_model_dir: Path,
            metrics_port: int) -> Iterator[dict[str, EngineProcess]]:
    """Side by side, what the selected tests need: `engine`, and each killing test's own."""
    drain = ("--drain-timeout", "60", "--stall-timeout", "120")  # its test reads late
    started = start_for_selected_tests(request, long_context_model_dir, {
        "engine": ("--max-num-seqs", "1", "--max-queue-len", "1",
                   "--metrics-port", str(metrics_port), "--metrics-compat"),
        "test_step_thread_death_fails_streams_and_exits_nonzero": ("--enable-test-hooks",),
        "test_drain_finishes_in_flight_rejects_new_and_exits_zero[sigterm]": drain,
        "test_drain_finishes_in_flight_rejects_new_and_exits_zero[admin_drain]": drain,
        "test_a_client_that_stops_reading_is_cancelled_without_slowing_others": (
            "--stall-timeout", "1"),
    })
    yield started
    stop_side_by_side(list(started.values()))


@pytest.fixture(scope="module")
def engine(servers: dict[str, EngineProcess], metrics_port: int) -> tuple[EngineProcess, str]:
    return servers["engine"], f"http://127.0.0.1:{metrics_port}/metrics"


@pytest.fixture()
def own_server(request: pytest.FixtureRequest, servers) -> Iterator[EngineProcess]:
    """This test's own server (see `servers`), stopped after it whatever it did to it."""
    server = servers[request.node.name]
    yield server
    server.stop()


@pytest.fixture()
def channel(engine: tuple[EngineProcess, str]) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(engine[0].grpc_address) as ch:
        wait_idle(ch)
        yield ch


def test_cancel_frees_kv_blocks_and_counts_as_cancelled(channel, engine) -> None:
    before = sample(scrape(engine[1]), "protoserve:request_success_total",
                    finished_reason="cancelled")
    call = open_stream(channel, long_request())
    next(call)
    load = get_load(channel)
    assert load.num_requests_running == 1 and load.num_free_kv_blocks < load.num_kv_blocks
    call.cancel()
    wait_idle(channel, FAULT_BOUND_S)
    metrics = scrape(engine[1])
    assert sample(metrics, "protoserve:request_success_total",
                  finished_reason="cancelled") == before + 1
    assert sample(metrics, "vllm:request_aborted_total", reason="cancelled") >= 1


def test_admin_abort_is_idempotent_and_counted_as_abort(channel, engine) -> None:
    admin = admin_pb2_grpc.AdminStub(channel)
    before = sample(scrape(engine[1]), "protoserve:request_aborted_total", reason="abort")
    call = open_stream(channel, long_request("abort-me"))
    next(call)
    reply = admin.Abort(admin_pb2.AbortRequest(request_ids=["abort-me"]), timeout=10)
    assert list(reply.aborted_request_ids) == ["abort-me"]
    # The stream ends normally, with the server-side reason (not the client's CANCELLED).
    assert finished_reasons(call) == [inference_pb2.FINISH_REASON_ABORT]
    again = admin.Abort(admin_pb2.AbortRequest(request_ids=["abort-me", "never-seen"]), timeout=10)
    assert list(again.aborted_request_ids) == []
    wait_idle(channel, FAULT_BOUND_S)
    after = sample(scrape(engine[1]), "protoserve:request_aborted_total", reason="abort")
    assert after == before + 1


def test_abort_racing_a_finishing_request_ends_each_stream_once(channel) -> None:
    admin = admin_pb2_grpc.AdminStub(channel)
    stub = inference_pb2_grpc.InferenceStub(channel)
    for i in range(8):
        request = short_request(max_tokens=1 + i % 3)
        request.request_id = f"race-{i}"
        call = stub.Generate(request, timeout=30)
        # Abort while the request may be finishing this very step.
        admin.Abort(admin_pb2.AbortRequest(request_ids=[request.request_id]), timeout=10)
        reasons = finished_reasons(call)
        assert len(reasons) == 1 and reasons[0] in (
            inference_pb2.FINISH_REASON_LENGTH, inference_pb2.FINISH_REASON_ABORT)
    wait_idle(channel, FAULT_BOUND_S)


def test_deadline_stops_decoding_and_evicts_queued(channel, engine) -> None:
    before = sample(scrape(engine[1]), "protoserve:request_aborted_total", reason="deadline")
    # Running: the deadline stops its decoding.
    with pytest.raises(grpc.RpcError) as running:
        list(inference_pb2_grpc.InferenceStub(channel).Generate(long_request(), timeout=1.5))
    assert running.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(channel, FAULT_BOUND_S)
    # Queued behind a long request (--max-num-seqs 1): the deadline evicts it from the queue.
    blocker = open_stream(channel, long_request())
    next(blocker)
    with pytest.raises(grpc.RpcError) as queued:
        list(inference_pb2_grpc.InferenceStub(channel).Generate(short_request(), timeout=1.0))
    assert queued.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: get_load(channel).num_requests_waiting == 0, FAULT_BOUND_S,
               "the expired request left the queue")
    assert get_load(channel).num_requests_running == 1
    blocker.cancel()
    wait_idle(channel, FAULT_BOUND_S)
    after = sample(scrape(engine[1]), "protoserve:request_aborted_total", reason="deadline")
    assert after == before + 2


def test_deadline_evicts_from_the_queue_before_it_ever_runs(channel, engine) -> None:
    """Queued behind a long request (--max-num-seqs 1), a request whose deadline passes (or has
    all but passed on arrival) ends DEADLINE_EXCEEDED without ever being scheduled: no
    `started` event, no tokens, no queue-time sample, no blocks left behind."""
    stub = inference_pb2_grpc.InferenceStub(channel)
    blocker = open_stream(channel, long_request())
    next(blocker)
    before = scrape(engine[1])
    for timeout in (1.0, 0.06):  # the engine keeps 0.05 s of a deadline for its own answer
        events: list = []
        with pytest.raises(grpc.RpcError) as expired:
            events.extend(stub.Generate(short_request(), timeout=timeout))
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert events == []
        wait_until(lambda: get_load(channel).num_requests_waiting == 0, FAULT_BOUND_S,
                   "the expired request left the queue")
    blocker.cancel()
    wait_idle(channel, FAULT_BOUND_S)
    after = scrape(engine[1])
    queue_count = "protoserve:request_queue_time_seconds_count"
    assert sample(after, queue_count) == sample(before, queue_count) + 1  # the blocker only
    assert sample(after, "protoserve:request_aborted_total", reason="deadline") >= sample(
        before, "protoserve:request_aborted_total", reason="deadline") + 1


def test_request_latency_split_histograms(channel, engine) -> None:
    """Every finished request adds one sample to each per-request histogram; queue +
    inference add up to e2e, prefill + decode to inference; token counts are exact."""
    stub = inference_pb2_grpc.InferenceStub(channel)
    max_tokens = [3, 5, 7]
    before = scrape(engine[1])
    for n in max_tokens:
        list(stub.Generate(short_request(max_tokens=n), timeout=60))
    wait_idle(channel, FAULT_BOUND_S)
    after = scrape(engine[1])

    def grew(name: str, prefix: str = "protoserve") -> float:
        return sample(after, f"{prefix}:{name}") - sample(before, f"{prefix}:{name}")

    for prefix in ("protoserve", "vllm"):
        for name in ("request_queue_time_seconds", "request_prefill_time_seconds",
                     "request_decode_time_seconds", "request_inference_time_seconds",
                     "e2e_request_latency_seconds", "request_prompt_tokens",
                     "request_generation_tokens", "request_params_n",
                     "request_params_max_tokens"):
            assert grew(f"{name}_count", prefix) == len(max_tokens), (prefix, name)
        assert grew("iteration_tokens_total_count", prefix) >= max(max_tokens)
    e2e = grew("e2e_request_latency_seconds_sum")
    queue, inference = (grew("request_queue_time_seconds_sum"),
                        grew("request_inference_time_seconds_sum"))
    # They end at the last Finished event; e2e also covers writing the final events out.
    assert 0.0 < inference and 0.5 * e2e <= queue + inference <= e2e
    assert grew("request_prefill_time_seconds_sum") + grew(
        "request_decode_time_seconds_sum") == pytest.approx(inference)
    assert grew("request_generation_tokens_sum") == sum(max_tokens)
    assert grew("request_params_max_tokens_sum") == sum(max_tokens)
    assert grew("request_params_n_sum") == len(max_tokens)
    prompt = grew("request_prompt_tokens_sum") / len(max_tokens)
    assert prompt == int(prompt) > 0
    # Each step computes the new tokens of the batch; every output token but the last per
    # request was computed in some step.
    assert grew("iteration_tokens_total_sum") >= sum(max_tokens) - len(max_tokens)


def test_queue_full_is_resource_exhausted_with_retry_info(channel) -> None:
    running = open_stream(channel, long_request())
    next(running)
    queued = inference_pb2_grpc.InferenceStub(channel).Generate(long_request(), timeout=60)
    wait_until(lambda: get_load(channel).num_requests_waiting == 1, FAULT_BOUND_S, "queued")
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as rejected:
        list(inference_pb2_grpc.InferenceStub(channel).Generate(short_request(), timeout=30))
    assert time.monotonic() - start < FAULT_BOUND_S  # immediately, not after queueing
    assert rejected.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(rejected.value)
    details = {d.type_url.rsplit("/", 1)[-1]: d for d in status.details}
    info = error_details_pb2.ErrorInfo()
    details["google.rpc.ErrorInfo"].Unpack(info)
    assert info.reason == "QUEUE_FULL"
    retry = error_details_pb2.RetryInfo()
    details["google.rpc.RetryInfo"].Unpack(retry)
    assert retry.retry_delay.ToNanoseconds() > 0
    running.cancel()
    queued.cancel()
    wait_idle(channel, FAULT_BOUND_S)


def test_engine_metrics_port_exports_reference_names(channel, engine) -> None:
    list(inference_pb2_grpc.InferenceStub(channel).Generate(short_request(), timeout=30))
    metrics = scrape(engine[1])
    for prefix in ("protoserve", "vllm"):
        for name in ("num_requests_running", "num_requests_waiting", "gpu_cache_usage_perc",
                     "gpu_prefix_cache_hit_rate", "num_preemptions_total",
                     "prompt_tokens_total", "generation_tokens_total",
                     "time_to_first_token_seconds_count", "time_per_output_token_seconds_count",
                     "e2e_request_latency_seconds_count"):
            assert any(k.partition("{")[0] == f"{prefix}:{name}" for k in metrics), name
    assert sample(metrics, "protoserve:request_success_total", finished_reason="length") >= 1
    assert sample(metrics, "protoserve:generation_tokens_total") >= 4


def test_health_list_and_watch(channel) -> None:
    from grpc_health.v1 import health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    listed = stub.List(health_pb2.HealthListRequest(), timeout=5)
    assert listed.statuses["protoserve.v1.Inference"].status == health_pb2.HealthCheckResponse.SERVING
    watch = stub.Watch(health_pb2.HealthCheckRequest(service="protoserve.v1.Inference"), timeout=5)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


# ----- destructive: one engine each ---------------------------------------------------------

def test_step_thread_death_fails_streams_and_exits_nonzero(own_server: EngineProcess) -> None:
    with grpc.insecure_channel(own_server.grpc_address) as ch:
        call = open_stream(ch, long_request(), timeout=120)
        next(call)
        os.kill(own_server.process.pid, signal.SIGUSR1)
        assert seconds_until_unavailable(call) < FAULT_BOUND_S
    assert own_server.process.wait(timeout=FAULT_BOUND_S + 10) != 0


def test_hung_step_thread_turns_not_serving_and_keep_alive_keeps_process(
    long_context_model_dir: Path,
) -> None:
    # Started now, not with the others: idle on a busy machine, its 1 s hang timeout could fire.
    own_server = start_engine(long_context_model_dir, "--enable-test-hooks",
                              "--engine-hang-timeout", "1", "--keep-alive-on-engine-death")
    try:
        with grpc.insecure_channel(own_server.grpc_address) as ch:
            call = open_stream(ch, long_request(), timeout=120)
            next(call)
            os.kill(own_server.process.pid, signal.SIGUSR2)
            assert seconds_until_unavailable(call) < FAULT_BOUND_S
            wait_until(lambda: readiness(ch) == health_pb2.HealthCheckResponse.NOT_SERVING,
                       FAULT_BOUND_S, "readiness NOT_SERVING")
            with pytest.raises(grpc.RpcError) as refused:
                list(inference_pb2_grpc.InferenceStub(ch).Generate(short_request(), timeout=10))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert own_server.process.poll() is None
        # SIGTERM still stops it cleanly: the hung core is killed at once, not waited for.
        own_server.process.send_signal(signal.SIGTERM)
        assert own_server.process.wait(timeout=FAULT_BOUND_S + 10) == 0
    finally:
        own_server.stop()


@pytest.mark.parametrize("trigger", ["sigterm", "admin_drain"])
def test_drain_finishes_in_flight_rejects_new_and_exits_zero(own_server: EngineProcess,
                                                              trigger: str) -> None:
    # In flight however fast the machine: unread, with no BDP probing, its HTTP/2 window
    # (64 KiB) is full after ~200 events of twenty logprobs; 600 tokens leave a wide margin.
    held = long_request(max_tokens=600)
    held.sampling.logprobs = 20
    with grpc.insecure_channel(own_server.grpc_address,
                               options=[("grpc.http2.bdp_probe", 0)]) as held_ch, \
            grpc.insecure_channel(own_server.grpc_address) as ch:
        call = open_stream(held_ch, held, timeout=120)
        if trigger == "sigterm":
            os.kill(own_server.process.pid, signal.SIGTERM)
        else:
            admin_pb2_grpc.AdminStub(ch).Drain(admin_pb2.DrainRequest(), timeout=10)
        wait_until(lambda: readiness(ch) == health_pb2.HealthCheckResponse.NOT_SERVING,
                   FAULT_BOUND_S, "readiness NOT_SERVING while draining")
        with pytest.raises(grpc.RpcError) as refused:
            list(inference_pb2_grpc.InferenceStub(ch).Generate(short_request(), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        hints = [d for d in rpc_status.from_call(refused.value).details
                 if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
        assert hints, "draining answers carry RetryInfo"
        assert get_load(ch).num_streams == 1, "the drain waits for the request in flight"
        events = list(call)
    finished = [e.finished for e in events if e.WhichOneof("event") == "finished"]
    assert [f.reason for f in finished] == [inference_pb2.FINISH_REASON_LENGTH]
    assert finished[0].completion_tokens == held.sampling.max_tokens
    assert own_server.process.wait(timeout=60) == 0


def test_a_client_that_stops_reading_is_cancelled_without_slowing_others(
    own_server: EngineProcess,
) -> None:
    # No BDP probing: the HTTP/2 window stays small, so the stall reaches the server soon.
    with grpc.insecure_channel(own_server.grpc_address,
                               options=[("grpc.http2.bdp_probe", 0)]) as stalled_ch, \
            grpc.insecure_channel(own_server.grpc_address) as ch:
        # Twenty logprobs make each event many times larger, so the transport's buffers fill
        # after hundreds of tokens rather than thousands: the same stall, seconds sooner.
        unread = long_request(max_tokens=8000)
        unread.sampling.logprobs = 20
        stalled = open_stream(stalled_ch, unread, timeout=300)
        stub = inference_pb2_grpc.InferenceStub(ch)
        for _ in range(5):  # others keep being served while it stalls
            start = time.monotonic()
            events = list(stub.Generate(short_request(8), timeout=60))
            assert events[-2].finished.reason == inference_pb2.FINISH_REASON_LENGTH
            assert time.monotonic() - start < FAULT_BOUND_S
        wait_idle(ch, 60)  # the stalled request was cancelled: every block is free
        with pytest.raises(grpc.RpcError) as ended:
            for _ in stalled:
                pass
        assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_python_client_cancels_times_out_and_reports_overload(engine) -> None:
    import asyncio
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "clients" / "python" / "protoserve_client.py"
    spec = importlib.util.spec_from_file_location("protoserve_client", path)
    client_mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = client_mod  # dataclasses resolve annotations through it
    spec.loader.exec_module(client_mod)

    async def scenario() -> None:
        async with client_mod.ProtoserveClient(engine[0].grpc_address) as client:
            done = await client.complete("hi", max_tokens=3, temperature=0.0)
            assert done.finish_reasons == {0: "length"} and done.completion_tokens == 3
            first = client.generate("hi", max_tokens=5000, ignore_eos=True)
            async for _ in first:
                break
            await first.aclose()  # closing the iterator early cancels the call
            with pytest.raises(client_mod.DeadlineExceeded):
                await client.complete("hi", max_tokens=5000, ignore_eos=True, timeout=1.0)
            # One running + one queued (--max-queue-len 1): the next is refused, with a hint.
            streams = [client.generate("hi", max_tokens=5000, ignore_eos=True)
                       for _ in range(2)]
            await anext(streams[0])
            waiting = asyncio.create_task(anext(streams[1]))
            while (await client.get_load()).num_requests_waiting < 1:
                await asyncio.sleep(0.05)
            with pytest.raises(client_mod.Overloaded) as overloaded:
                await client.complete("hi", max_tokens=2)
            assert overloaded.value.reason == "QUEUE_FULL" and overloaded.value.retry_after_s
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            for stream in streams:
                await stream.aclose()

    asyncio.run(scenario())
    with grpc.insecure_channel(engine[0].grpc_address) as ch:
        wait_idle(ch, FAULT_BOUND_S)
