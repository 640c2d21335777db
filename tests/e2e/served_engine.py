"""Running the real `engine-serve` (engine + bridge) as a subprocess group on 127.0.0.1."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
# Model loading and warm-up on a busy 2-core machine can take a while.
SERVER_START_TIMEOUT_S = 180.0
SHUTDOWN_GRACE_S = 10.0


@dataclass(frozen=True)
class RunningServer:
    base_url: str
    grpc_port: int
    model_dir: Path


def reserve_port() -> int:
    """A port that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the whole group (engine and bridge), SIGKILL whatever is left after 10 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=SHUTDOWN_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        # The bridge child may outlive its parent; the group id still reaches it.
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=SHUTDOWN_GRACE_S)


def wait_for_health(base_url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"engine-serve exited with {process.returncode} during start-up")
        try:
            if httpx.get(f"{base_url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{base_url}/health was not 200 within {timeout} s")
