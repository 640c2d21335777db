"""engine-serve's production-serving flags and run loop: back-pressure, deadlines, drain,
engine-death handling, metrics, request logs and tracing (kept apart from cli.py's model flags)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the server stack is imported lazily: `engine-serve --help` stays fast
    from engine.server.grpc_server import EngineServer

logger = logging.getLogger("engine.cli")


def add_serving_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("serving (service mesh)")
    g.add_argument("--grpc-uds", default=None, metavar="PATH",
                   help="also serve gRPC on this Unix socket (a bridge sidecar sharing a volume)")
    g.add_argument("--max-queue-len", type=int, default=None,
                   help="requests allowed to wait for admission; more get RESOURCE_EXHAUSTED "
                   "(HTTP 429) with a retry hint (default: unbounded)")
    g.add_argument("--stall-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="cancel a streaming client that reads nothing for this long")
    g.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM or Admin/Drain, wait this long for running requests")
    g.add_argument("--max-connection-age", type=float, default=None, metavar="SECONDS",
                   help="send GOAWAY to gRPC connections older than this, so clients rebalance")
    g.add_argument("--engine-hang-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="no step-thread heartbeat for this long = the engine is dead")
    g.add_argument("--keep-alive-on-engine-death", action="store_true",
                   help="keep the process (health NOT_SERVING) when the engine dies, instead "
                   "of exiting non-zero for the supervisor to restart it")
    g.add_argument("--enable-test-hooks", action="store_true",
                   help="testing only: SIGUSR1 kills the step thread, SIGUSR2 hangs it")
    g.add_argument("--metrics-port", type=int, default=None,
                   help="serve the engine's Prometheus /metrics on this port")
    g.add_argument("--metrics-compat", action="store_true",
                   help="also export every metric under the vllm: prefix")
    g.add_argument("--disable-log-requests", action="store_true",
                   help="no per-request log line")
    g.add_argument("--max-log-len", type=int, default=0,
                   help="prompt characters a request log line may show (default 0: none)")
    g.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                   help="the bridge's deadline for each engine call (HTTP 504 when it expires)")
    g.add_argument("--otlp-traces-endpoint", default=None, metavar="URL",
                   help="export OpenTelemetry spans (bridge and engine) to this OTLP endpoint; "
                   "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=grpc|http/protobuf picks the protocol "
                   "(needs pip install 'protoserve[otel]')")


def grpc_lifecycle_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The GrpcServerConfig fields these flags set."""
    return {"max_connection_age_s": args.max_connection_age,
            "engine_hang_timeout_s": args.engine_hang_timeout}


def bridge_serving_args(args: argparse.Namespace) -> list[str]:
    extra: list[str] = []
    if args.request_timeout is not None:
        extra += ["--request-timeout", str(args.request_timeout)]
    if args.metrics_compat:
        extra.append("--metrics-compat")
    if args.otlp_traces_endpoint:
        extra += ["--otlp-traces-endpoint", args.otlp_traces_endpoint]
    return extra


async def serve(server: EngineServer, args: argparse.Namespace) -> int:
    """Start, load, then wait for a drain request (SIGTERM/SIGINT/Admin.Drain) or engine death.

    Exit codes: 0 after a drain; 1 when the engine died (unless --keep-alive-on-engine-death),
    so a supervisor (Kubernetes, systemd) restarts the process.
    """
    from engine.server.lifecycle import (
        install_test_hooks,
        make_engine_metrics,
        start_metrics_server,
    )
    from engine.server.request_tracker import ServingOptions
    from protoserve.tracing import init_tracer

    handle = server.handle
    handle.options = ServingOptions(
        max_queue_len=args.max_queue_len, stall_timeout_s=args.stall_timeout,
        log_requests=not args.disable_log_requests, max_log_len=args.max_log_len,
    )
    handle.metrics = make_engine_metrics(handle, args.metrics_compat)
    handle.tracer = init_tracer("protoserve-engine", args.otlp_traces_endpoint)
    metrics_http = None
    if args.metrics_port is not None:
        metrics_http = start_metrics_server(handle.metrics.render, args.host, args.metrics_port)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handle.shutdown_requested.set)
    if args.enable_test_hooks:
        install_test_hooks(handle)
    load = asyncio.create_task(server.load_engine())
    stop = asyncio.create_task(handle.shutdown_requested.wait())
    died = asyncio.create_task(handle.engine_died.wait())
    try:
        done, _ = await asyncio.wait({load, stop}, return_when=asyncio.FIRST_COMPLETED)
        if load in done and load.exception() is not None:
            await server.stop(0)
            raise load.exception()
        if stop in done and not load.done():
            logger.info("stopping before the model finished loading")
            load.cancel()
            await server.stop(0)
            return 0
        watched = {stop} if args.keep_alive_on_engine_death else {stop, died}
        done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        if stop not in done:
            logger.error("the engine died: exiting with status 1 "
                         "(--keep-alive-on-engine-death keeps the process)")
            await server.stop(1.0)  # the failed streams' statuses still go out
            return 1
        logger.info("draining: up to %.0f s for running requests", args.drain_timeout)
        finished = await server.drain(args.drain_timeout)
        logger.info("drained (%s); shutting down", "all finished" if finished else "timed out")
        await server.stop(1.0)
        return 0
    finally:
        for task in (stop, died):
            task.cancel()
        if metrics_http is not None:
            metrics_http.shutdown()
