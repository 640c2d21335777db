"""End-to-end fixture: the real `engine-serve` (engine + bridge subprocesses) on 127.0.0.1,
serving the suite's tiny Llama."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from served_engine import (
    REPO_ROOT,
    SERVER_START_TIMEOUT_S,
    RunningServer,
    reserve_port,
    stop_process_group,
    wait_for_health,
)


@pytest.fixture(scope="session")
def served_model(tiny_llama_dir: Path) -> Iterator[RunningServer]:
    port, grpc_port = reserve_port(), reserve_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "--model", str(tiny_llama_dir),
         "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port),
         "--kv-cache-memory", "64MiB", "--dtype", "float32"],
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base_url, process, SERVER_START_TIMEOUT_S)
        yield RunningServer(base_url=base_url, grpc_port=grpc_port, model_dir=tiny_llama_dir)
    finally:
        stop_process_group(process)
