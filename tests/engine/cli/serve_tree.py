"""An engine-serve process tree seen from outside: its children by role, what is left of its
process group, its health as a Watch stream sees it, and whether a port is free again."""
from __future__ import annotations

import socket
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

READINESS = "protoserve.v1.Inference"
LIVENESS = ""
_MARKERS = {"bridge": b"rest_bridge", "core": b"engine.core.process_main"}


def children(server_pid: int) -> dict[str, int]:
    """{"bridge": pid, "core": pid} among the processes `server_pid` started (any thread)."""
    found: dict[str, int] = {}
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        try:
            pids = (task / "children").read_text().split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        for pid in map(int, pids):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            found.update({role: pid for role, marker in _MARKERS.items() if marker in argv})
    return found


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def is_gone(pid: int) -> bool:
    """Exited: reaped, or a zombie left to whoever adopted it (here PID 1 may never reap)."""
    return _state(pid) in (None, "Z", "X")


def live_group_members(pgid: int) -> list[int]:
    """Processes of group `pgid` still running (zombies do not count: they hold nothing)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            alive.append(int(entry.name))
    return alive


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class HealthWatch:
    """Every status a grpc.health.v1 Watch of `service` reports, until its stream ends."""

    def __init__(self, channel: grpc.Channel, service: str) -> None:
        request = health_pb2.HealthCheckRequest(service=service)
        self._call = health_pb2_grpc.HealthStub(channel).Watch(request, timeout=300)
        self.statuses = [next(self._call).status]  # the current one, at once
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for reply in self._call:
                self.statuses.append(reply.status)
        except grpc.RpcError:  # the server went away
            pass

    def until_closed(self, timeout: float) -> list[int]:
        self._reader.join(timeout)
        self._call.cancel()
        return self.statuses


def health_status(channel: grpc.Channel, service: str) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5).status
