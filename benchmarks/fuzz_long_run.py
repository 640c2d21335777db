"""The fuzz tier at a large budget against one engine-serve (gRPC + bridge, tiny model):
schemathesis with all its default checks on /openapi.json, then hypothesis-generated
GenerateRequest messages on gRPC (tests/engine/server/test_grpc_fuzz.py's strategy). Prints
the cases, the status classes seen, and the server's health and free KV blocks afterwards.

    nice -n 10 .venv/bin/python -m benchmarks.fuzz_long_run                  # ~10 minutes
    .venv/bin/python -m benchmarks.fuzz_long_run --schemathesis-examples 5 --grpc-examples 60
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
# The fuzz tier's strategies and helpers.
sys.path[:0] = [str(REPO_ROOT / "tests"), str(REPO_ROOT / "tests" / "engine" / "server")]

from engine_process import start_engine  # noqa: E402
from mesh_helpers import get_load, wait_idle  # noqa: E402
from model_factory import build_tiny_model  # noqa: E402
from openapi_fuzz import run_schemathesis, served_model  # noqa: E402

from protoserve.v1 import inference_pb2, inference_pb2_grpc  # noqa: E402

_CLIENT_CLASS = {"INVALID_ARGUMENT", "NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION",
                 "UNIMPLEMENTED", "RESOURCE_EXHAUSTED"}


def _schemathesis(url: str, grpc_address: str, examples: int, seed: int) -> bool:
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "statuses.log"
        start = time.monotonic()
        result = run_schemathesis(url, served_model(grpc_address), max_examples=examples,
                                  seed=seed, timeout=3600, status_log=log)
        seconds = time.monotonic() - start
        statuses = [line.rsplit(" ", 1)[1] for line in log.read_text().splitlines()]
    classes = collections.Counter(f"{status[0]}xx" for status in statuses)
    codes = collections.Counter(statuses)
    summary = [line for line in result.stdout.splitlines()
               if "generated" in line or "passed" in line or "failure" in line][-2:]
    print(f"schemathesis: {len(statuses)} requests in {seconds:.0f} s, "
          f"{examples} examples per operation and phase, exit {result.returncode}")
    print(f"  status classes: {dict(sorted(classes.items()))}; "
          f"codes: {dict(sorted(codes.items()))}")
    for line in summary:
        print(f"  {line.strip()}")
    if result.returncode != 0:
        print(result.stdout[-6000:])
    return result.returncode == 0


def _grpc(grpc_address: str, examples: int) -> bool:
    from hypothesis import HealthCheck, given, settings
    from test_grpc_fuzz import _bounded, _fields, _fill

    seen: collections.Counter[str] = collections.Counter()
    with grpc.insecure_channel(grpc_address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        @settings(max_examples=examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(values=_fields(inference_pb2.GenerateRequest.DESCRIPTOR, 0))
        def one(values: dict) -> None:
            request = inference_pb2.GenerateRequest()
            _fill(request, values)
            try:
                list(stub.Generate(_bounded(request), timeout=60))
                seen["OK"] += 1
            except grpc.RpcError as error:
                seen[error.code().name] += 1

        start = time.monotonic()
        one()
        seconds = time.monotonic() - start
    bad = {code: count for code, count in seen.items()
           if code != "OK" and code not in _CLIENT_CLASS}
    print(f"gRPC Generate: {sum(seen.values())} requests in {seconds:.0f} s; "
          f"statuses {dict(sorted(seen.items()))}; outside OK and the client-error class: {bad}")
    return not bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemathesis-examples", type=int, default=150,
                        help="examples per operation and phase (the CI test uses 5)")
    parser.add_argument("--grpc-examples", type=int, default=3000,
                        help="generated GenerateRequest messages (the CI test uses 60)")
    parser.add_argument("--seed", type=int, default=20261207)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = build_tiny_model(Path(scratch) / "tiny")
        server = start_engine(model, "--max-model-len", "256", role="all")
        try:
            assert server.http_url is not None
            ok = _schemathesis(server.http_url, server.grpc_address, args.schemathesis_examples,
                               args.seed)
            ok = _grpc(server.grpc_address, args.grpc_examples) and ok
            with grpc.insecure_channel(server.grpc_address) as channel:
                health = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="protoserve.v1.Inference"), timeout=10)
                wait_idle(channel, 60)
                load = get_load(channel)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)
            print(f"after: health {status}, "
                  f"KV blocks free {load.num_free_kv_blocks}/{load.num_kv_blocks}, "
                  f"server process {'alive' if server.process.poll() is None else 'exited'}")
        finally:
            server.stop()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
