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
        [sys.executable, "-m", "protoserve.cli.serve", "--role", "engine", "--host", "127.0.0.1",
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


_WITHOUT_OTLP_EXPORTER = (
    # The exporter made unimportable, as on a machine without the otel extra.
    "import sys; sys.modules['opentelemetry.exporter.otlp.proto.grpc.trace_exporter'] = None; "
    "from protoserve.cli.serve import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.mark.parametrize(
    ("command", "env", "expected"),
    [
        (["-c", _WITHOUT_OTLP_EXPORTER], {}, "pip install 'protoserve[otel]'"),
        (["-m", "protoserve.cli.serve"], {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "carrier-pigeon"},
         "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
    ],
)
def test_tracing_that_cannot_work_fails_before_loading(command, env, expected) -> None:
    import os

    result = subprocess.run(
        [sys.executable, *command, "--role", "engine", "--model", "/nonexistent",
         "--otlp-traces-endpoint", "http://127.0.0.1:4317"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, **env},
    )
    assert result.returncode == 2, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1 and expected in error_lines[0], result.stderr


@pytest.mark.parametrize("engine_core", ["process", "thread"])
def test_truncated_weights_fail_with_one_line_in_either_core(
    tmp_path: Path, tiny_llama_dir: Path, engine_core: str
) -> None:
    """Weights are read where the core runs: in the engine core process, its failure still
    reaches engine-serve's stderr as one line naming the file."""
    import shutil

    model = tmp_path / "truncated"
    shutil.copytree(tiny_llama_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = _serve("--model", str(model), "--engine-core", engine_core)
    assert result.returncode != 0
    error_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert len(error_lines) == 1, result.stderr
    assert error_lines[0].startswith("error:") and "model.safetensors" in error_lines[0]
