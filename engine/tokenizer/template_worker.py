"""Chat templates sent with a request render in a worker process with a time and memory bound.

Jinja's sandbox stops a template from reaching Python internals, but not from spending:
nested loops over `range(100000)` run for minutes, and a template that builds a 1 GB string
takes the memory with it. A request-supplied template is arbitrary code from a client, so it
renders here: in one child process (a fresh interpreter running `serve_fd`: the serving
process has threads, so no fork) whose address space is capped (`MEMORY_LIMIT_BYTES`), and which is killed and replaced when a render takes
longer than `timeout_s`. Either way the request gets an InvalidRequestError naming
`chat_template`, and the server's other requests never notice. Templates the operator chose
(`--chat-template`, the model's own) render in-process as before: they are trusted and hot.
"""
from __future__ import annotations

import resource
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from engine.errors import InvalidRequestError

MEMORY_LIMIT_BYTES = 1 << 30
DEFAULT_TIMEOUT_S = 5.0
# Starting the child (a fresh interpreter importing the tokenizer package) is not the
# template's time.
START_TIMEOUT_S = 120.0
_READY = "ready"
# Not `-m` this module: the package imports it first, and runpy would run it twice.
_CHILD = "import sys; from engine.tokenizer.template_worker import serve_fd; serve_fd(sys.argv[1])"
# The prompt a template may produce; far beyond any context window, far below the memory cap.
MAX_OUTPUT_CHARS = 16 << 20


class TemplateWorker:
    """Renders untrusted templates one at a time in a child process (started on first use)."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None

    def render(self, **kwargs: Any) -> str:
        """`render_chat_template(**kwargs)` in the child; InvalidRequestError on a template
        error, a timeout or the memory cap."""
        with self._lock:
            conn = self._connection()
            conn.send(kwargs)
            if not conn.poll(self.timeout_s):
                self._kill()
                raise InvalidRequestError(
                    f"the chat template did not finish rendering within {self.timeout_s:g} s",
                    field="chat_template")
            try:
                status, value, field = conn.recv()
            except (EOFError, OSError):  # the child died: the memory cap, or killed
                self._kill()
                raise InvalidRequestError(
                    "the chat template used more memory than a template may",
                    field="chat_template") from None
        if status == "ok":
            return value
        raise InvalidRequestError(value, field=field)

    def close(self) -> None:
        with self._lock:
            self._kill()

    def _connection(self) -> Connection:
        if self._process is None or self._process.poll() is not None:
            ours, theirs = socket.socketpair()
            self._process = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
            theirs.close()
            parent = self._conn = Connection(ours.detach())
            if not parent.poll(START_TIMEOUT_S) or parent.recv() != _READY:
                self._kill()
                raise InvalidRequestError("the chat template worker did not start",
                                          field="chat_template")
        assert self._conn is not None
        return self._conn

    def _kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=5)
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None


def _serve(conn: Connection) -> None:
    """The child: render each request, answer (status, text or message, field)."""
    from engine.tokenizer.chat_template import render_chat_template

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    conn.send(_READY)
    while True:
        try:
            kwargs = conn.recv()
        except (EOFError, OSError):  # the serving process is gone
            return
        try:
            rendered = render_chat_template(**kwargs)
            if len(rendered) > MAX_OUTPUT_CHARS:
                raise InvalidRequestError(
                    f"the chat template rendered {len(rendered)} characters; at most "
                    f"{MAX_OUTPUT_CHARS}", field="chat_template")
            conn.send(("ok", rendered, None))
        except InvalidRequestError as error:
            if isinstance(error.__cause__, MemoryError):  # the template's own error path
                conn.send(("error", "the chat template used more memory than a template may",
                           "chat_template"))
            else:
                conn.send(("error", error.message, error.field))
        except MemoryError:
            conn.send(("error", "the chat template used more memory than a template may",
                       "chat_template"))



def serve_fd(fd: str) -> None:
    _serve(Connection(int(fd)))
