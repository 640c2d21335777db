"""The commands the documentation gives a new user, run as pasted.

`make serve` (README's first command) starts the demo model on its default ports, then every
client command of README.md and clients/README.md runs against it unchanged: the Python
examples, the OpenAI SDK snippet, and the Node.js suite (`PROTOSERVE_ADDRESS=127.0.0.1:50051
npm test`). Benchmark commands (too long to run here) are parsed by their own argument
parsers, flags and values included, without running. grpcurl lines run where grpcurl is
installed.

The server binds the documented ports 8000 and 50051; when another process holds them (a
developer's own `make serve`), the server tests skip rather than fight over the ports.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "clients" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REST_PORT, GRPC_PORT = 8000, 50051
START_TIMEOUT_S = 300.0  # bootstrap's check, the demo model's first build, model load

pytestmark = pytest.mark.e2e


def _code_blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), re.S)


def _client_commands() -> list[str]:
    """Command lines of the docs' bash blocks that call a running server's client."""
    commands = []
    for doc in DOCS:
        for block in _code_blocks(doc, "bash"):
            for line in block.replace("\\\n", " ").splitlines():
                command = line.split("  #")[0].strip()
                if command.startswith((".venv/bin/python clients/", "clients/", "grpcurl ")):
                    commands.append(command)
    return commands


def _benchmark_commands() -> list[str]:
    """`.venv/bin/python -m benchmarks.X ...` spans; a trailing `...` (an elided tail) is cut."""
    spans = []
    for doc in DOCS:
        for span in re.findall(r"`(\.venv/bin/python -m benchmarks\.[^`]*)`", doc.read_text()):
            spans.append(" ".join(span.split()).removesuffix(" ...").strip())
    return sorted(set(spans))


def test_docs_name_the_venv_interpreter() -> None:
    """A bare `python -m ...` fails on a fresh clone unless the venv is activated."""
    bare = [f"{doc.name}: {line.strip()}" for doc in DOCS for line in doc.read_text().splitlines()
            if re.search(r"(^|[`\s])python3? (-m |scripts/|clients/)", line)]
    assert not bare, "commands that need .venv/bin/python:\n" + "\n".join(bare)


def test_docs_have_the_commands_this_module_runs() -> None:
    # The extraction itself: an edit that changes the docs' shape must not empty these lists.
    assert len(_client_commands()) >= 4 and len(_benchmark_commands()) >= 10


_DRY_PARSE = r"""
import argparse, json, runpy, shlex, sys

class Parsed(Exception):
    pass

def parse_args(self, args=None, namespace=None):
    namespace, extras = self.parse_known_args(args, namespace)
    if extras:
        self.error("unrecognized arguments: " + " ".join(extras))
    raise Parsed()

argparse.ArgumentParser.parse_args = parse_args
results = {}
for command in json.loads(sys.argv[1]):
    argv = shlex.split(command)
    module = argv[2]
    sys.argv = [module, *argv[3:]]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        results[command] = "ran to the end without parsing its arguments"
    except Parsed:
        results[command] = "ok"
    except SystemExit as exc:
        results[command] = f"exit {exc.code}"
    except Exception as exc:  # a module that does not exist or fails to import
        results[command] = f"{type(exc).__name__}: {exc}"
print(json.dumps(results))
"""


def test_benchmark_commands_parse() -> None:
    """Each documented benchmark command: the module exists, every flag is one it takes and
    every value converts. The parser is stopped right after parsing, so nothing runs."""
    commands = _benchmark_commands()
    result = subprocess.run([str(ROOT / ".venv/bin/python"), "-c", _DRY_PARSE,
                             json.dumps(commands)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout.splitlines()[-1])
    failed = {c: o for c, o in outcomes.items() if o != "ok"}
    assert not failed, f"{failed}\n{result.stderr[-3000:]}"


def _port_taken(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def make_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """README's first command, as pasted, in its own process group; yields its log file."""
    if _port_taken(REST_PORT) or _port_taken(GRPC_PORT):
        pytest.skip(f"ports {REST_PORT}/{GRPC_PORT} are in use: `make serve` needs them")
    log_path = tmp_path_factory.mktemp("make-serve") / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(["make", "--no-print-directory", "serve"], cwd=ROOT,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"make serve exited:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready:\n{log_path.read_text()[-3000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{REST_PORT}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield log_path
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


@pytest.mark.parametrize("command", _client_commands())
def test_client_command_runs_as_pasted(make_serve: Path, command: str) -> None:
    if command.startswith(("grpcurl ", "clients/grpcurl/")) and shutil.which("grpcurl") is None:
        pytest.skip("grpcurl is not installed")
    result = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert result.stdout.strip(), f"{command} printed nothing"


def test_readme_openai_snippet_runs_as_pasted(make_serve: Path) -> None:
    snippets = [s for s in _code_blocks(ROOT / "README.md", "python") if "OpenAI(" in s]
    assert len(snippets) == 1
    result = subprocess.run([sys.executable, "-c", snippets[0]], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout, "the streamed chat printed no text"


def test_node_suite_against_make_serve(make_serve: Path) -> None:
    """clients/README.md: `PROTOSERVE_ADDRESS=127.0.0.1:50051 npm test` against `make serve`;
    the suite reads the served context length instead of assuming one."""
    npm, node_dir = shutil.which("npm"), ROOT / "clients" / "node"
    if shutil.which("node") is None or npm is None:
        pytest.skip("node/npm not on PATH: the Node client suite needs them")
    readme = (ROOT / "clients" / "README.md").read_text()
    assert f"PROTOSERVE_ADDRESS=127.0.0.1:{GRPC_PORT} npm test" in readme
    if not (node_dir / "node_modules" / "@grpc" / "grpc-js").is_dir():
        # From the lock file, into the git-ignored clients/node/node_modules.
        install = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=node_dir,
                                 capture_output=True, text=True, timeout=300)
        assert install.returncode == 0, f"npm ci failed: {install.stderr[-2000:]}"
    env = {**os.environ, "PROTOSERVE_ADDRESS": f"127.0.0.1:{GRPC_PORT}"}
    result = subprocess.run(shlex.split("npm test"), cwd=node_dir, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout and "# skipped 0" in result.stdout, result.stdout


def test_make_serve_names_both_addresses_once(make_serve: Path) -> None:
    """Start-up ends with one line naming both APIs; no phase message is repeated."""
    deadline = time.monotonic() + 60
    while "OpenAI API: " not in make_serve.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = make_serve.read_text()
    ready = [line for line in log.splitlines() if "OpenAI API: " in line]
    assert len(ready) == 1, log[-3000:]
    assert re.search(rf"OpenAI API: http://\S+:{REST_PORT}/v1\s+gRPC: \S+:{GRPC_PORT}", ready[0])
    assert log.count("Detected the chat template content format") <= 1, log[-3000:]
    assert log.count("KV cache: ") == 1, log[-3000:]
