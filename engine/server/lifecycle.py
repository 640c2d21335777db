"""Engine lifecycle around the gRPC server: the step-thread watchdog, drain, the Prometheus
endpoint, and the test hooks that break the step thread on purpose."""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from engine.frontend.served_model import Engine
from engine.errors import EngineUnavailableError
from engine.server.context import EngineHandle
from engine.server.request_tracker import load_snapshot
from protoserve.listeners import ListenError, check_tcp, tcp_address
from protoserve.serving_metrics import CONTENT_TYPE, ServingMetrics
from protoserve.vllm_compat import cache_config_labels

logger = logging.getLogger(__name__)

_WATCH_INTERVAL_S = 0.25


def connection_age_options(max_age_s: float | None) -> list[tuple[str, int]]:
    """gRPC server options that send GOAWAY after `max_age_s` (plus a grace for the calls
    still running), so clients reconnect and a load balancer can move them."""
    if max_age_s is None:
        return []
    return [
        ("grpc.max_connection_age_ms", int(max_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(max(max_age_s, 30.0) * 1000)),
    ]


async def watch_engine(engine: Engine, hang_timeout_s: float) -> None:
    """Return once the step thread is dead, or hung (no heartbeat for `hang_timeout_s`); a hung
    engine is declared dead so open streams end with UNAVAILABLE instead of hanging."""
    loop = engine.loop
    while loop.is_alive:
        stale = time.monotonic() - loop.last_heartbeat
        if stale > hang_timeout_s:
            logger.warning("engine step thread shows no heartbeat for %.1f s: declaring it "
                           "dead", stale)
            loop.mark_dead(EngineUnavailableError("the engine step thread is hung",
                                                  reason="ENGINE_DEAD"))
            break
        await asyncio.sleep(_WATCH_INTERVAL_S)
    # engine-serve logs the one error line, with the reason (serve_loop.py).
    logger.debug("engine step thread is not running; readiness -> NOT_SERVING")


async def wait_for_idle(engine: Engine | None, timeout: float) -> bool:
    """Wait until no Generate stream is open, at most `timeout` seconds."""
    if engine is None:
        return True
    deadline = time.monotonic() + timeout
    while engine.loop.num_streams > 0 and engine.loop.is_alive:
        if time.monotonic() >= deadline:
            logger.warning("drain timeout: %d request(s) still running", engine.loop.num_streams)
            return False
        await asyncio.sleep(0.05)
    return True


def install_test_hooks(handle: EngineHandle) -> None:
    """--enable-test-hooks only: SIGUSR1 kills the step thread, SIGUSR2 hangs it."""
    loop = asyncio.get_running_loop()

    def inject(kind: str) -> None:
        engine = handle.engine
        if engine is not None:
            logger.warning("test hook: making the step thread %s", kind)
            engine.loop.inject_fault(kind)

    loop.add_signal_handler(signal.SIGUSR1, inject, "die")
    loop.add_signal_handler(signal.SIGUSR2, inject, "hang")


def make_engine_metrics(handle: EngineHandle, compat: bool) -> ServingMetrics:
    """Gauges come from the loaded engine at scrape time (none while it loads)."""

    def load():
        engine = handle.engine
        return load_snapshot(engine) if engine is not None else None

    def extra() -> dict[str, float]:
        engine = handle.engine
        return {
            "engine_ready": float(engine is not None and engine.loop.is_alive
                                  and not handle.draining),
            "num_open_streams": float(engine.loop.num_streams) if engine is not None else 0.0,
            "num_threads": float(threading.active_count()),
        }

    def model_name() -> str:
        return handle.engine.model.names[0] if handle.engine is not None else ""

    def cache_config() -> dict[str, str] | None:
        engine = handle.engine
        if engine is None:
            return None
        cache = engine.config.cache
        return cache_config_labels(
            block_size=engine.model.block_size, num_gpu_blocks=engine.model.num_blocks,
            gpu_memory_utilization=cache.gpu_memory_utilization,
            num_gpu_blocks_override=cache.num_blocks,
            enable_prefix_caching=cache.enable_prefix_caching,
        )

    return ServingMetrics(model_name, load=load, extra_gauges=extra, cache_config=cache_config,
                          compat_prefixes=("vllm",) if compat else (), request_phases=True)


def start_metrics_server(render: Callable[[], bytes], host: str, port: int) -> ThreadingHTTPServer:
    """GET /metrics on its own port and thread: a scrape never waits for the event loop."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = render()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # scrapes every few seconds are not news
            pass

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:  # the same one line as every other port engine-serve binds
        check_tcp(host, port, "--metrics-port")  # names the reason; raises ListenError
        raise ListenError(tcp_address(host, port), "--metrics-port", str(exc)) from None
    server.daemon_threads = True
    # shutdown() waits for serve_forever's next poll (0.5 s by default) at every stop.
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                     name="metrics-http", daemon=True).start()
    logger.info("metrics on http://%s/metrics", tcp_address(host, server.server_address[1]))
    return server
