"""Every listener engine-serve (or engine-bridge) cannot bind stops it at start-up: exit 1,
one line on stderr naming the address and its flag, and nothing started. The ports are
checked (the REST one bound, for the bridge child) before any model loads or child starts.
"""
from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from engine_process import REPO_ROOT
from serve_tree import live_group_members

from protoserve.listeners import ListenError, bind_tcp, check_unix

IN_USE = "address already in use"


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _run(*args: str, module: str = "protoserve.cli.serve") -> subprocess.CompletedProcess[str]:
    """Run to its end in a process group of its own; nothing of the group may outlive it."""
    process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    stdout, stderr = process.communicate(timeout=120)
    assert live_group_members(process.pid) == [], "a child outlived the failed start"
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("flag", ["--port", "--grpc-port", "--metrics-port"])
def test_a_taken_port_stops_engine_serve(taken_port: int, flag: str) -> None:
    ports = {"--port": "0", "--grpc-port": "0", flag: str(taken_port)}
    # No --model: the check comes before the demo model would even be looked for.
    result = _run("--host", "127.0.0.1", *(x for item in ports.items() for x in item))
    assert _one_error_line(result) == (
        f"engine-serve: error: cannot listen on 127.0.0.1:{taken_port} ({flag}): {IN_USE}")


def test_a_port_another_grpc_server_holds_is_taken_too() -> None:
    """grpc servers share ports by default (SO_REUSEPORT): a second engine must not start
    on one and quietly get half of its connections."""

    async def run() -> subprocess.CompletedProcess[str]:
        other = grpc.aio.server()
        port = other.add_insecure_port("127.0.0.1:0")
        await other.start()
        try:
            return await asyncio.to_thread(_run, "--role", "engine", "--host", "127.0.0.1",
                                           "--grpc-port", str(port))
        finally:
            await other.stop(None)

    line = _one_error_line(asyncio.run(run()))
    assert "(--grpc-port)" in line and IN_USE in line


def test_a_unix_socket_a_live_server_holds_is_taken(tmp_path: Path) -> None:
    path = tmp_path / "engine.sock"
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen()
        result = _run("--role", "engine", "--host", "127.0.0.1", "--grpc-port", "0",
                      "--grpc-uds", str(path))
    assert _one_error_line(result) == (
        f"engine-serve: error: cannot listen on unix:{path} (--grpc-uds): {IN_USE}")
    assert path.exists()  # the other server's socket is left alone


@pytest.mark.parametrize("command", [("protoserve.cli.serve", "--role", "bridge"),
                                     ("rest_bridge",)])
def test_a_taken_port_stops_the_bridge(taken_port: int, command: tuple[str, ...]) -> None:
    module, *role = command
    result = _run(*role, "--engine-address", "127.0.0.1:1", "--host", "127.0.0.1",
                  "--port", str(taken_port), module=module)
    prog = "engine-serve" if module == "protoserve.cli.serve" else "engine-bridge"
    assert _one_error_line(result) == (
        f"{prog}: error: cannot listen on 127.0.0.1:{taken_port} (--port): {IN_USE}")


def test_unix_socket_paths(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as gone:
        gone.bind(str(stale))  # bound, never listening, then closed: a left-over file
    check_unix(str(stale), "--grpc-uds")  # a server may replace it
    check_unix(str(tmp_path / "new.sock"), "--grpc-uds")
    (tmp_path / "file").write_text("not a socket")
    with pytest.raises(ListenError, match="not a socket"):
        check_unix(str(tmp_path / "file"), "--grpc-uds")
    with pytest.raises(ListenError, match="no such directory"):
        check_unix(str(tmp_path / "missing" / "x.sock"), "--grpc-uds")


def test_bind_tcp_names_address_flag_and_reason(taken_port: int) -> None:
    with pytest.raises(ListenError) as caught:
        bind_tcp("127.0.0.1", taken_port, "--port")
    assert str(caught.value) == f"cannot listen on 127.0.0.1:{taken_port} (--port): {IN_USE}"
    with bind_tcp("::1" if socket.has_ipv6 else "127.0.0.1", 0, "--port") as sock:
        assert sock.getsockname()[1] > 0
