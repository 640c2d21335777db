"""Listening addresses both servers check or bind before they serve, so a port that is taken
stops the server at start-up with one line naming the address and the flag that set it:

    cannot listen on 0.0.0.0:8000 (--port): address already in use

The gRPC server binds its own ports (grpc core offers no way to adopt a socket), so its
addresses are probed here first: grpc's own bind error says neither which flag nor why, and
on a Unix socket path grpc silently unlinks a live server's socket and takes it over.
"""
from __future__ import annotations

import errno
import os
import socket
import stat

# As uvicorn's default: connections the kernel queues before the bridge accepts them.
_BACKLOG = 2048


class ListenError(Exception):
    """An address a server cannot listen on; str() is the one line to print."""

    def __init__(self, address: str, flag: str | None, reason: str) -> None:
        self.address, self.flag, self.reason = address, flag, reason
        where = f" ({flag})" if flag else ""
        super().__init__(f"cannot listen on {address}{where}: {reason}")


def tcp_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_tcp(host: str, port: int, flag: str | None, *, listen: bool = True) -> socket.socket:
    """A TCP socket bound to host:port (listening unless `listen` is false), or ListenError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As uvicorn and grpc set it: a port left in TIME_WAIT by a restart is free, while a
        # port another socket listens on still fails with EADDRINUSE.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError(tcp_address(host, port), flag, _reason(exc)) from None
    return sock


def check_tcp(host: str, port: int, flag: str | None) -> None:
    """Raise ListenError when host:port cannot be bound now (the server binds it later)."""
    bind_tcp(host, port, flag, listen=False).close()


def check_unix(path: str, flag: str | None) -> None:
    """Raise ListenError when a server cannot take the Unix socket `path`: a live server
    answers on it, something other than a socket is there, or its directory is missing. A
    stale socket file (its server gone) is fine: the server replaces it."""
    address = f"unix:{path}"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise ListenError(address, flag, f"no such directory: {directory}") from None
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ListenError(address, flag, _reason(PermissionError(errno.EACCES, ""))) from None
        return
    if not stat.S_ISSOCK(mode):
        raise ListenError(address, flag, "the path exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return  # stale: nobody listens there
    raise ListenError(address, flag, _reason(OSError(errno.EADDRINUSE, "")))


def _reason(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host ({exc.strerror})"
    if exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return str(exc)
