"""Bridge settings: fixed at start-up, shared read-only by every request."""
from __future__ import annotations

from dataclasses import dataclass

_UNIX_PREFIX = "unix:"


def validate_engine_address(address: str) -> str:
    """Return `address` if gRPC can dial it: `host:port`, `[v6]:port`, `unix:/path` or
    `unix:///abs/path`. Raise ValueError with a one-line reason otherwise."""
    if address.startswith(_UNIX_PREFIX):
        path = address[len(_UNIX_PREFIX):]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError(f"engine address {address!r} names no socket path")
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"engine address {address!r} must be host:port, unix:/path or unix:///abs/path"
        )
    return address


@dataclass(frozen=True, slots=True)
class BridgeSettings:
    """Where the engine is, where the bridge listens, and per-request limits.

    `request_timeout` is the gRPC deadline in seconds put on every engine call; None leaves
    calls without a deadline so long generations are never cut short by the bridge.
    `api_key`, when set, is required as `Authorization: Bearer <key>` on every /v1 route.
    """

    engine_address: str
    host: str = "127.0.0.1"
    port: int = 8000
    request_timeout: float | None = None
    api_key: str | None = None
    root_path: str = ""
    uvicorn_log_level: str = "info"
    # How long /health waits for the engine's health service before answering 503.
    health_timeout: float = 2.0

    def __post_init__(self) -> None:
        validate_engine_address(self.engine_address)
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} is outside 0..65535")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError("request timeout must be > 0 seconds")
        if self.health_timeout <= 0:
            raise ValueError("health timeout must be > 0 seconds")
