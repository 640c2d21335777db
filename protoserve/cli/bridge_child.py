"""The REST bridge as a supervised child of engine-serve (`--role all`).

    engine-serve                                 bridge child (python -m rest_bridge)
    binds --port before anything starts  --fd--> serves on that listening socket
    socket pair end  <------- b"ready\\n" ------- once uvicorn accepts connections
                     <------------ EOF ---------- the bridge exited: engine-serve stops
                     ------------- EOF ---------> engine-serve is gone (even SIGKILLed):
                                                  the bridge drains and exits; Linux also
                                                  sends it SIGTERM (PR_SET_PDEATHSIG)

The child drains on SIGTERM (uvicorn's graceful shutdown, up to --drain-timeout), so
engine-serve sends it one when its own drain starts: both finish their running requests
side by side and the bridge accepts no new ones.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys

from protoserve.cli.serving_args import bridge_serving_args
from protoserve.cli.surface_args import bridge_env, bridge_surface_args
from rest_bridge.chat_options import chat_args, chat_options_from_args


def bridge_args(args: argparse.Namespace) -> list[str]:
    """engine-bridge's command line for engine-serve's flags (without the engine address)."""
    return ["--host", args.host, "--port", str(args.port),
            "--uvicorn-log-level", args.uvicorn_log_level,
            *chat_args(chat_options_from_args(args)),
            *bridge_serving_args(args), *bridge_surface_args(args)]


class BridgeChild:
    """Starts the bridge on `listener` (bound and listening; the child takes it over)."""

    def __init__(self, engine_address: str, args: argparse.Namespace,
                 listener: socket.socket) -> None:
        self.port: int = listener.getsockname()[1]
        ours, theirs = socket.socketpair()
        fds = (listener.fileno(), theirs.fileno())
        cmd = [sys.executable, "-m", "rest_bridge", "--engine-address", engine_address,
               *bridge_args(args), "--listen-fd", str(fds[0]), "--supervisor-fd", str(fds[1]),
               "--supervisor-pid", str(os.getpid())]
        # The API key travels in the environment, not argv (visible to every local user).
        self.process = subprocess.Popen(cmd, env=bridge_env(args), pass_fds=fds)
        # The child owns the port now: if it dies, the port must free up at once rather
        # than queue connections nobody accepts.
        listener.close()
        theirs.close()
        self._link = ours
        self._link.setblocking(False)
        self._ready: asyncio.Event | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    async def wait_ready(self) -> None:
        """Returns once the bridge serves; never, if it exits before."""
        await self._ready_event().wait()

    async def wait_exit(self) -> int:
        """The bridge's exit status, once it has exited (its end of the socket pair closes
        then, however it ended)."""
        loop = asyncio.get_running_loop()
        while await loop.sock_recv(self._link, 64):
            self._ready_event().set()
        return await asyncio.to_thread(self.process.wait)

    def terminate(self) -> None:
        """SIGTERM: the bridge stops accepting connections and drains its running requests."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float) -> None:
        """Terminate, wait up to `timeout` s for the drain, then kill."""
        self.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._link.close()

    def _ready_event(self) -> asyncio.Event:
        if self._ready is None:  # made inside the running loop
            self._ready = asyncio.Event()
        return self._ready
