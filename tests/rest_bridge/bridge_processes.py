"""Starting and stopping the bridge as a real subprocess on 127.0.0.1."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from engine_process import free_port, require_e2e_marker

REPO_ROOT = Path(__file__).resolve().parents[2]
BRIDGE_START_TIMEOUT_S = 60.0


def reserve_port() -> int:
    """A free port no other server of this test process was given (engine_process.free_port)."""
    return free_port()


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL it if it is still there after 10 s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def wait_until_up(url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bridge exited with {process.returncode} before answering {url}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout} s")


def start_bridge(engine_address: str, *extra_args: str) -> tuple[subprocess.Popen[bytes], str]:
    require_e2e_marker("the bridge started")
    port = reserve_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "rest_bridge", "--engine-address", engine_address,
         "--host", "127.0.0.1", "--port", str(port), "--uvicorn-log-level", "warning",
         *extra_args],
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{base_url}/ping", process, BRIDGE_START_TIMEOUT_S)
    except BaseException:
        stop_process_group(process)
        raise
    return process, base_url
