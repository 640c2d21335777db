"""The Node.js client (clients/node) against a live engine: starts one, then `npm test` with
PROTOSERVE_ADDRESS pointing at it. Skipped with a message when node/npm are absent."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from engine_process import REPO_ROOT, start_engine
from mesh_helpers import build_long_context_model

NODE_DIR = REPO_ROOT / "clients" / "node"


def test_node_client_suite(tmp_path: Path) -> None:
    npm = shutil.which("npm")
    if shutil.which("node") is None or npm is None:
        pytest.skip("node/npm not on PATH: the Node client suite needs them")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        # From the lock file, into the git-ignored clients/node/node_modules.
        install = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR,
                                 capture_output=True, text=True, timeout=300)
        if install.returncode != 0:
            pytest.skip(f"npm ci failed (no registry?): {install.stderr[-500:]}")
    engine = start_engine(build_long_context_model(tmp_path / "model"))
    try:
        env = {**os.environ, "PROTOSERVE_ADDRESS": engine.grpc_address}
        result = subprocess.run([npm, "test"], cwd=NODE_DIR, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
        assert "# fail 0" in result.stdout and "# skipped 0" in result.stdout, result.stdout
    finally:
        engine.stop()
