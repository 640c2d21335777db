"""A model directory that cannot be served stops `engine-serve` at start-up with one clear
line on stderr and a non-zero exit code, not a traceback."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "--role", "engine", "--host", "127.0.0.1",
         "--grpc-port", "0", "--log-level", "error", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )


def _unsupported_model(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    return path


@pytest.mark.parametrize(
    ("make_dir", "expected"),
    [
        (lambda tmp: tmp / "does-not-exist", "does-not-exist"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "config.json"),
        (lambda tmp: _unsupported_model(tmp / "gpt2"), "GPT2LMHeadModel"),
    ],
)
def test_unservable_model_fails_with_one_line(tmp_path: Path, make_dir, expected: str) -> None:
    result = _serve("--model", str(make_dir(tmp_path)))
    assert result.returncode != 0
    error_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert len(error_lines) == 1, result.stderr
    assert error_lines[0].startswith("error:") and expected in error_lines[0]
