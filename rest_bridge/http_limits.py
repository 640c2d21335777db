"""Connection limits of the bridge's HTTP server, as a security review expects them.

uvicorn bounds the number of connections (`limit_concurrency`: 503 beyond it) and idle
keep-alive connections (`timeout_keep_alive`), but with httptools it bounds neither the size nor
the number of request headers, and it waits forever for headers or a body that trickle in (a
slow-loris client holds a connection and its buffers for as long as it likes). This protocol
is uvicorn's own httptools protocol with those bounds added at its parser callbacks; the
parsing stays httptools':

- headers (request line included) over `max_header_bytes`, or more than `max_headers` of them:
  431 and the connection closes;
- a request whose headers are not complete `header_timeout_s` after the connection opened or
  the request began: 408 and close (an idle connection that never sends a request included);
- a request body that sends nothing for `body_timeout_s`: 408 (when no response has started)
  and close; the app sees the disconnect.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    header_timeout_s: float = 30.0
    body_timeout_s: float = 30.0
    keep_alive_timeout_s: int = 5
    max_connections: int | None = 2048


def limited_protocol(limits: HttpLimits) -> type[HttpToolsProtocol]:
    """uvicorn's `http=` protocol class with `limits` (uvicorn builds one per connection)."""
    return type("LimitedHttpToolsProtocol", (_LimitedHttpToolsProtocol,), {"limits": limits})


class _LimitedHttpToolsProtocol(HttpToolsProtocol):
    limits: HttpLimits

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._in_headers = True
        self._header_bytes = 0
        self._header_count = 0
        # (status, message) once a limit refused the request; answered in send_400_response.
        self._refusal: tuple[int, str] | None = None

    # -- timers -----------------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        started = self.cycle is not None and self.cycle.response_started
        if self._in_headers or not started:
            what = "request headers" if self._in_headers else "the request body"
            self._respond(408, f"{what} did not arrive in time")
        else:
            self.transport.close()

    # -- parser callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._header_bytes = self._header_count = 0
        self._arm(self.limits.header_timeout_s)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._count(len(url), 0)

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._count(len(name) + len(value), 1)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._arm(self.limits.body_timeout_s)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._arm(self.limits.body_timeout_s)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def _count(self, num_bytes: int, num_headers: int) -> None:
        self._header_bytes += num_bytes
        self._header_count += num_headers
        limits = self.limits
        if self._header_bytes > limits.max_header_bytes:
            self._refusal = (431, f"request headers over {limits.max_header_bytes} bytes")
        elif self._header_count > limits.max_headers:
            self._refusal = (431, f"more than {limits.max_headers} request headers")
        else:
            return
        # httptools turns the exception into HttpParserError, which uvicorn answers through
        # send_400_response: below, with the refusal's own status.
        raise ValueError(self._refusal[1])

    def send_400_response(self, msg: str) -> None:
        if self._refusal is None:
            super().send_400_response(msg)
        else:
            self._respond(*self._refusal)

    def _respond(self, status: int, message: str) -> None:
        self._disarm()
        body = message.encode("ascii")
        self.transport.write(b"".join([
            STATUS_LINE[status], b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: ", str(len(body)).encode("ascii"), b"\r\n",
            b"connection: close\r\n\r\n", body]))
        self.transport.close()
