"""A running engine-serve (engine + bridge) as the OpenAI-SDK tests see it, and waiting for
the bridge's /health (the bridge answers 200 once it reaches its engine)."""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass(frozen=True)
class RunningServer:
    base_url: str
    grpc_port: int
    model_dir: Path


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
