"""Starting `engine-serve` (python -m protoserve.cli.serve) as a real subprocess on 127.0.0.1 and
waiting until it is ready."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

if TYPE_CHECKING:  # only for annotations: benchmarks import this module without pytest
    import pytest

F = TypeVar("F", bound=Callable[..., object])
REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180.0
# Readiness polls: the suite starts dozens of servers, and each start waits on average
# half an interval after the server is ready; a probe costs the server microseconds.
POLL_INTERVAL_S = 0.05

# Whether the running test carries the `e2e` marker: set by tests/conftest.py before each
# test's setup; None outside pytest. start_engine refuses to run for an unmarked test.
running_e2e_test: bool | None = None


def starts_servers(fixture_function: F) -> F:
    """Marks a fixture function (below its @pytest.fixture) that starts real servers: every
    test that uses it, directly or through other fixtures, gets the `e2e` marker."""
    fixture_function.starts_servers = True  # type: ignore[attr-defined]
    return fixture_function


def require_e2e_marker(what: str) -> None:
    if running_e2e_test is False:
        raise RuntimeError(
            f"{what} in a test without the e2e marker: mark it @pytest.mark.e2e, or mark the "
            "fixture that starts it @starts_servers (engine_process), so that the fast tier "
            "(-m 'not e2e') leaves it out")


_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_range() -> tuple[int, int]:
    """This test process's share of the ports below the ephemeral range. Under pytest-xdist
    each worker draws from its own slice: `_handed_out` is per process, so two workers
    drawing from one range could hand the same port to two servers starting side by side."""
    low = min(_ephemeral_low(), 32768)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index = int(worker) if worker.isdigit() else 0
    width = max((low - 20000) // max(workers, 1), 0)
    return 20000 + index * width, 20000 + (index + 1) * width


def free_port() -> int:
    """A port nothing listens on, never handed out before in this test process, and below
    the kernel's ephemeral range. Servers start side by side: a port from bind(0) could be
    handed to two of them, or taken by an outgoing connection's ephemeral port before the
    server binds it ("address already in use")."""
    first, end = _port_range()
    rng = random.Random()
    with _handed_out_lock:
        for _ in range(200):
            port = rng.randrange(first, end) if end - first > 1000 else 0
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                port = sock.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError("no free port found")


@dataclass
class EngineProcess:
    process: subprocess.Popen[bytes]
    grpc_address: str
    http_url: str | None

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def core_process_pids(server_pid: int) -> list[int]:
    """The engine core process(es) an engine-serve process started (`--engine-core process`)."""
    found = []
    for task in os.listdir(f"/proc/{server_pid}/task"):
        try:
            children = open(f"/proc/{server_pid}/task/{task}/children").read().split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        for pid in map(int, children):
            try:
                argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            except FileNotFoundError:
                continue
            if b"engine.core.process_main" in argv:
                found.append(pid)
    return found


def wait_ready(
    address: str,
    process: subprocess.Popen[bytes],
    timeout: float,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Poll grpc.health.v1 readiness (service protoserve.v1.Inference) until SERVING."""
    deadline = time.monotonic() + timeout
    channel_cm = (grpc.secure_channel(address, credentials) if credentials is not None
                  else grpc.insecure_channel(address))
    with channel_cm as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"engine exited with {process.returncode} before it was ready")
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service="protoserve.v1.Inference"), timeout=1.0
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(POLL_INTERVAL_S)
    raise RuntimeError(f"engine at {address} not ready within {timeout} s")


def wait_bridge(url: str, process: subprocess.Popen[bytes], timeout: float,
                verify: str | bool = True) -> None:
    """Poll the bridge's liveness route (`/ping`, open even with an API key) until 200."""
    import httpx  # only the role-all tests need it

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"engine-serve exited with {process.returncode} during start-up")
        try:
            if httpx.get(f"{url}/ping", timeout=2.0, verify=verify).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(POLL_INTERVAL_S)
    raise RuntimeError(f"bridge at {url} not up within {timeout} s")


def start_engine(
    model_dir: Path,
    *extra_args: str,
    role: str = "engine",
    env: dict[str, str] | None = None,
    channel_credentials: grpc.ChannelCredentials | None = None,
    https_ca: str | None = None,
    log_path: Path | None = None,
    kv_cache_memory: str | None = "64MiB",
) -> EngineProcess:
    """`env` is added to this process's environment; `channel_credentials` is for a TLS gRPC
    port; `https_ca` (a CA file) makes the REST URL https, verified against that CA;
    `log_path` receives the process's stdout and stderr (the bridge child's too)."""
    require_e2e_marker("engine-serve started")
    grpc_port = free_port()
    http_port = free_port() if role == "all" else None
    args = [sys.executable, "-m", "protoserve.cli.serve", "--role", role, "--model", str(model_dir),
            "--host", "127.0.0.1", "--grpc-port", str(grpc_port), "--dtype", "float32",
            "--log-level", "warning"]
    if kv_cache_memory is not None:  # None: the engine sizes it (on CUDA, by profiling)
        args += ["--kv-cache-memory", kv_cache_memory]
    if http_port is not None:
        args += ["--port", str(http_port)]
    log = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115 - the child's
    try:
        process = subprocess.Popen([*args, *extra_args], cwd=REPO_ROOT, start_new_session=True,
                                   env={**os.environ, **(env or {})}, stdout=log,
                                   stderr=subprocess.STDOUT if log is not None else None)
    finally:
        if log is not None:
            log.close()  # the child holds its own descriptor
    scheme = "https" if https_ca else "http"
    handle = EngineProcess(
        process, f"127.0.0.1:{grpc_port}",
        f"{scheme}://127.0.0.1:{http_port}" if http_port else None,
    )
    try:
        wait_ready(handle.grpc_address, process, START_TIMEOUT_S, channel_credentials)
        if handle.http_url is not None:
            wait_bridge(handle.http_url, process, START_TIMEOUT_S, https_ca or True)
    except BaseException:
        handle.stop()
        raise
    return handle


def start_side_by_side(starts: Sequence[Callable[[], EngineProcess]]) -> list[EngineProcess]:
    """Run several server starts at once; their servers, in the same order. A start is mostly
    its processes' imports, a core each, so on two cores a pair costs about one start. If one
    fails, the others are stopped and its error raised."""
    with ThreadPoolExecutor(max(len(starts), 1)) as pool:
        futures = [pool.submit(start) for start in starts]
    failed = [future.exception() for future in futures if future.exception() is not None]
    if failed:
        stop_side_by_side([future.result() for future in futures if future.exception() is None])
        raise failed[0]
    return [future.result() for future in futures]


def start_for_selected_tests(request: pytest.FixtureRequest, model_dir: Path,
                             flags: dict[str, tuple[str, ...]]) -> dict[str, EngineProcess]:
    """The servers of `flags` that the selected tests of the requesting module need, started
    side by side. A key names a test id (that test's own server) or a fixture (the server of
    every test that uses it, directly or not)."""
    selected = [item for item in request.session.items if item.module is request.module]
    needed = [name for name in flags
              if any(name in (item.name, *item.fixturenames) for item in selected)]
    started = start_side_by_side([partial(start_engine, model_dir, *flags[name])
                                  for name in needed])
    return dict(zip(needed, started, strict=True))


def stop_side_by_side(servers: Sequence[EngineProcess]) -> None:
    """Stop several servers at once: each stop waits on its server's drain."""
    with ThreadPoolExecutor(max(len(servers), 1)) as pool:
        list(pool.map(EngineProcess.stop, servers))
