"""--max-queue-len bounds the requests waiting for a slot (the reference server's
num_requests_waiting), not the requests that have not streamed yet: a burst that fits in the
free slots is admitted whole, even though none of it has reached a step when it arrives."""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from engine_process import EngineProcess
from mesh_helpers import short_request, wait_idle

from protoserve.v1 import inference_pb2_grpc

pytestmark = pytest.mark.e2e
BURST = 20


def test_a_burst_that_fits_the_free_slots_is_never_refused(
    shared_server: Callable[..., EngineProcess],
) -> None:
    engine = shared_server("--max-queue-len", "4")  # 256 slots (--max-num-seqs default)
    with grpc.insecure_channel(engine.grpc_address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        def one(_: int) -> grpc.StatusCode:
            try:
                events = list(stub.Generate(short_request(max_tokens=8), timeout=120))
            except grpc.RpcError as error:
                return error.code()
            assert events[-1].WhichOneof("event") == "usage"
            return grpc.StatusCode.OK

        for _ in range(3):  # three bursts: arrivals also overlap running requests
            with ThreadPoolExecutor(BURST) as pool:
                codes = list(pool.map(one, range(BURST)))
            assert codes == [grpc.StatusCode.OK] * BURST, codes
        wait_idle(channel)
