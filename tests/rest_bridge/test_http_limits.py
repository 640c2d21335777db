"""The bridge's connection limits over raw sockets: oversized or too many headers get 431,
headers or a body that trickle in get 408 and the connection closes (an idle connection that
never sends a request too), idle keep-alive connections close, connections beyond the limit
get 503 - and ordinary requests are untouched."""
from __future__ import annotations

import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from bridge_processes import start_bridge, stop_process_group
from engine_process import starts_servers
from scripted_engine import ScriptedEngine

pytestmark = pytest.mark.e2e
# Generous: the limits are 1 s, the bound only has to beat "never" on a busy machine.
BOUND_S = 20.0


@pytest.fixture(scope="module")
@starts_servers
def tight(scripted_engine: ScriptedEngine) -> Iterator[tuple[str, int]]:
    process, url = start_bridge(
        f"127.0.0.1:{scripted_engine.port}", "--max-header-bytes", "4096", "--max-headers", "20",
        "--header-timeout", "1", "--body-timeout", "1", "--keep-alive-timeout", "1")
    yield _address(url)
    stop_process_group(process)


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname, parts.port


def _exchange(address: tuple[str, int], data: bytes) -> bytes:
    """Send `data`, then read until the server closes the connection."""
    with socket.create_connection(address, timeout=BOUND_S) as sock:
        sock.sendall(data)
        return _read_to_close(sock)


def _read_to_close(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def _get(extra_headers: bytes = b"") -> bytes:
    return b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + extra_headers + b"\r\n"


def test_ordinary_requests_pass(tight: tuple[str, int]) -> None:
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(10))
    assert _exchange(tight, _get(headers)).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("headers", [
    b"X-Big: " + b"a" * (1 << 20) + b"\r\n",  # one 1 MiB value
    b"".join(b"X-H%d: v\r\n" % i for i in range(5000)),  # 5,000 headers
])
def test_oversized_or_too_many_headers_get_431(tight: tuple[str, int], headers: bytes) -> None:
    reply = _exchange(tight, _get(headers))
    assert reply.startswith(b"HTTP/1.1 431"), reply[:200]


def test_trickling_headers_get_408_and_close(tight: tuple[str, int]) -> None:
    reply = _exchange(tight, b"GET /ping HTTP/1.1\r\nHost: x\r\n")  # never finished
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"request headers" in reply


def test_a_connection_that_never_sends_a_request_is_closed(tight: tuple[str, int]) -> None:
    assert _exchange(tight, b"").startswith(b"HTTP/1.1 408")


def test_a_stalled_body_gets_408_and_close(tight: tuple[str, int]) -> None:
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n")
    reply = _exchange(tight, head + b'{"prompt": ')
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"request body" in reply


def test_idle_keep_alive_connections_close(tight: tuple[str, int]) -> None:
    with socket.create_connection(tight, timeout=BOUND_S) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive
        # The server closes it (a socket timeout of BOUND_S would fail the read instead).
        reply = _read_to_close(sock)
    assert reply.startswith(b"HTTP/1.1 200")


def test_connections_beyond_the_limit_get_503(scripted_engine: ScriptedEngine) -> None:
    process, url = start_bridge(f"127.0.0.1:{scripted_engine.port}", "--max-connections", "4",
                                "--header-timeout", "120")
    address = _address(url)
    # Accepted in order: the four idle ones are connections before the fifth sends anything.
    idle = [socket.create_connection(address, timeout=BOUND_S) for _ in range(4)]
    try:
        assert _exchange(address, _get()).startswith(b"HTTP/1.1 503")
    finally:
        for sock in idle:
            sock.close()
        stop_process_group(process)
    assert process.returncode is not None
