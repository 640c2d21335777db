"""engine-serve's run loop: start, load, announce, then supervise until a drain or a death.

    gRPC (and --metrics-port) listen; liveness SERVING, readiness NOT_SERVING
    the model loads (in the engine core process); the bridge child starts meanwhile
    one line once gRPC and the bridge both serve:
        OpenAI API: http://HOST:8000/v1   gRPC: HOST:50051
    then the first of:
        SIGTERM / SIGINT / Admin.Drain (or the bridge exiting 0) -> drain both, exit 0
        the engine core dies or hangs                              -> exit 1
            (--keep-alive-on-engine-death: log it, stay up with readiness NOT_SERVING)
        the bridge child dies (a signal, the OOM killer, a crash)  -> exit 1

On a death, liveness and readiness turn NOT_SERVING, open streams end with UNAVAILABLE, the
other child is stopped, and the process exits 1: a dead child is not restarted here.
Restarting the core means reloading the model, as slow as restarting the process; restarting
the bridge in place would hide a crash loop from the supervisor (Kubernetes, systemd) that
counts restarts and backs off. One policy for both: the orchestrator restarts the whole.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import TYPE_CHECKING

from protoserve.listeners import tcp_address

if TYPE_CHECKING:  # the server stack is imported lazily: `engine-serve --help` stays fast
    from protoserve.cli.bridge_child import BridgeChild
    from engine.server.grpc_server import EngineServer

logger = logging.getLogger("protoserve.cli.serve")

_stop_signalled = False


def catch_stop_signals() -> None:
    """From the start of engine-serve until serve() takes over: remember SIGTERM/SIGINT.
    Otherwise one arriving during the imports or the demo model build kills the process
    (exit -15) or raises KeyboardInterrupt wherever start-up is; remembered, it stops the
    server as soon as it can, with exit 0."""

    def remember(signum: int, frame: object) -> None:
        global _stop_signalled
        _stop_signalled = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, remember)


async def serve(server: EngineServer, args: argparse.Namespace,
                bridge: BridgeChild | None = None) -> int:
    """Serve until drained (0) or until the engine or `bridge` dies (1). Raises ListenError
    for a port it cannot bind, and the load's error (ModelLoadError) when the model fails."""
    from engine.server.lifecycle import (
        install_test_hooks,
        make_engine_metrics,
        start_metrics_server,
    )
    from engine.server.admission import default_max_request_memory
    from engine.server.request_tracker import ServingOptions
    from protoserve.cli.parser_args import parsing_defaults
    from protoserve.tracing import init_tracer

    handle = server.handle
    handle.options = ServingOptions(
        max_queue_len=args.max_queue_len, stall_timeout_s=args.stall_timeout,
        log_requests=not args.disable_log_requests, max_log_len=args.max_log_len,
        max_n=args.max_n, max_prompt_bytes=args.max_prompt_bytes,
        max_request_memory=args.max_request_memory or default_max_request_memory(),
        kv_events_max_pending=args.kv_events_max_pending,
        kv_events_replay_batches=args.kv_events_replay_batches,
        **parsing_defaults(args),
    )
    handle.metrics = make_engine_metrics(handle, args.metrics_compat)
    handle.tracer = init_tracer("protoserve-engine", args.otlp_traces_endpoint)
    metrics_http = None
    try:
        if args.metrics_port is not None:
            metrics_http = start_metrics_server(handle.metrics.render, args.host,
                                                args.metrics_port)
        await server.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, handle.shutdown_requested.set)
        if _stop_signalled:
            handle.shutdown_requested.set()
        if args.enable_test_hooks:
            install_test_hooks(handle)
        return await _supervise(server, args, bridge)
    finally:
        if metrics_http is not None:
            metrics_http.shutdown()


def ready_line(args: argparse.Namespace, grpc_port: int, bridge: BridgeChild | None) -> str:
    grpc = f"gRPC: {tcp_address(args.host, grpc_port)}"
    if args.grpc_uds:
        grpc += f"   gRPC: unix:{args.grpc_uds}"
    if bridge is None:
        return grpc
    scheme = "https" if args.ssl_certfile else "http"
    return f"OpenAI API: {scheme}://{tcp_address(args.host, bridge.port)}/v1   {grpc}"


async def _supervise(server: EngineServer, args: argparse.Namespace,
                     bridge: BridgeChild | None) -> int:
    handle = server.handle
    load = asyncio.create_task(server.load_engine())
    stop = asyncio.create_task(handle.shutdown_requested.wait())
    died = asyncio.create_task(handle.engine_died.wait())
    bridge_exit = asyncio.create_task(bridge.wait_exit()) if bridge is not None else None
    bridge_ready = asyncio.create_task(bridge.wait_ready()) if bridge is not None else None
    watched = {task for task in (load, stop, died, bridge_exit, bridge_ready) if task is not None}
    try:
        while True:
            done, watched = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            if load in done and load.exception() is not None:
                if bridge is not None:
                    bridge.terminate()
                await server.stop(0)
                raise load.exception()
            if bridge_exit in done and bridge_exit.result() != 0:
                from engine.frontend.core_client import describe_exit

                return await _fail(server, bridge, load, f"the REST bridge (pid {bridge.pid}) "
                                   f"{describe_exit(bridge_exit.result())}")
            if died in done:
                engine = handle.engine
                reason = engine.loop.error if engine is not None else None
                if not args.keep_alive_on_engine_death:
                    return await _fail(server, bridge, load, f"the engine died: {reason}")
                logger.error("the engine died: %s; --keep-alive-on-engine-death keeps the "
                             "process, readiness NOT_SERVING", reason)
            if stop in done or bridge_exit in done:
                if stop not in done:  # exit 0: someone stopped the bridge (SIGTERM)
                    logger.info("the REST bridge stopped: stopping too")
                if not load.done():
                    logger.info("stopping before the model finished loading")
                    _abort_loading(load)
                    if bridge is not None:
                        bridge.terminate()
                    await server.stop(0)
                    return 0
                return await _drain(server, bridge, args)
            if (done & {load, bridge_ready} and load.done()
                    and (bridge_ready is None or bridge_ready.done())):
                logger.info("%s", ready_line(args, server.port, bridge))
    finally:
        for task in (stop, died, bridge_exit, bridge_ready):
            if task is not None:
                task.cancel()


async def _drain(server: EngineServer, bridge: BridgeChild | None,
                 args: argparse.Namespace) -> int:
    logger.info("draining: up to %.0f s for running requests", args.drain_timeout)
    if bridge is not None:
        # The bridge drains its HTTP requests (the same --drain-timeout) while the engine
        # drains their streams, and accepts no new connections meanwhile.
        bridge.terminate()
    finished = await server.drain(args.drain_timeout)
    logger.info("drained (%s); shutting down", "all finished" if finished else "timed out")
    await server.stop(1.0)
    return 0


async def _fail(server: EngineServer, bridge: BridgeChild | None, load: asyncio.Task,
                reason: str) -> int:
    logger.error("%s; exiting with status 1", reason)
    await server.set_not_serving()
    if bridge is not None:
        bridge.terminate()
    if not load.done():
        _abort_loading(load)
    await server.stop(1.0)  # the failed streams' statuses still go out
    return 1


def _abort_loading(load: asyncio.Task) -> None:
    """The load runs on a thread that asyncio cannot cancel, and the process would wait for
    it at exit: a core process still loading is killed, which ends that thread at once."""
    from engine.frontend.core_client import abort_starting

    load.cancel()
    abort_starting()
