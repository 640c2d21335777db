"""A supervised child process (the REST bridge that engine-serve starts) must not outlive its
supervisor, even one killed with SIGKILL or by the OOM killer: an orphaned bridge keeps the
REST port and answers 503 forever.

Two mechanisms, because each covers a gap of the other: Linux's parent-death signal is sent
by the kernel however the parent ends, even while our event loop is stuck; the supervisor
socket reaches EOF when the parent is gone on any platform. `exit_with_parent` rechecks the
parent after asking for the signal, since a parent that died before the request sends none.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
READY_MESSAGE = b"ready\n"


def exit_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> bool:
    """Have the kernel send `sig` to this process when its parent exits (Linux; elsewhere a
    no-op). Returns False when the parent `parent_pid` is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    # Reparented (to init or a subreaper) before the request: the signal will never come.
    return os.getppid() == parent_pid


class SupervisorLink:
    """The child's end of a socket pair with its supervisor: `notify_ready` tells it the
    child serves; `on_gone` runs (on a daemon thread) once the supervisor's end closes."""

    def __init__(self, fd: int, on_gone: Callable[[], None]) -> None:
        self._sock = socket.socket(fileno=fd)
        self._on_gone = on_gone
        threading.Thread(target=self._watch, name="supervisor-watch", daemon=True).start()

    def notify_ready(self) -> None:
        try:
            self._sock.sendall(READY_MESSAGE)
        except OSError:
            pass  # the supervisor is gone; _watch reports that

    def _watch(self) -> None:
        try:
            while self._sock.recv(64):
                pass
        except OSError:
            pass
        self._on_gone()
