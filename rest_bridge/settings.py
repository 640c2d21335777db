"""Bridge settings: fixed at start-up, shared read-only by every request."""
from __future__ import annotations

from dataclasses import dataclass, field

from rest_bridge.chat_options import ChatOptions
from rest_bridge.http_limits import HttpLimits

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
    # Tool-call parsing and media limits of chat requests.
    chat: ChatOptions = field(default_factory=ChatOptions)
    # Sent to the engine as `authorization: Bearer <key>` metadata; None sends nothing.
    engine_api_key: str | None = None
    # Hex SHA-256 of the engine's admin key: the runtime LoRA routes accept that key
    # (rest_bridge/middleware.py); None: they take the API key like every /v1 route.
    admin_key_sha256: str | None = None
    # CORS; no origins means no CORS middleware at all.
    allowed_origins: tuple[str, ...] = ()
    allow_credentials: bool = False
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    disable_docs: bool = False
    # TLS for the HTTP listener (uvicorn); ssl_cert_reqs is an ssl.CERT_* value.
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    ssl_ca_certs: str | None = None
    ssl_cert_reqs: int = 0
    # /metrics repeats every family under the vllm: prefix too.
    metrics_compat: bool = False
    # OTLP endpoint the bridge's spans go to; None: no spans (trace headers still forwarded).
    otlp_traces_endpoint: str | None = None
    # On SIGTERM: how long running requests may take before they are cancelled.
    drain_timeout: float = 30.0
    # Header size and count, header/body read timeouts, keep-alive, connections.
    http_limits: HttpLimits = field(default_factory=HttpLimits)

    def __post_init__(self) -> None:
        validate_engine_address(self.engine_address)
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} is outside 0..65535")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError("request timeout must be > 0 seconds")
        if self.health_timeout <= 0:
            raise ValueError("health timeout must be > 0 seconds")
        if self.drain_timeout < 0:
            raise ValueError("--drain-timeout must be >= 0 seconds")
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("TLS needs both --ssl-keyfile and --ssl-certfile")
        if self.ssl_cert_reqs and not self.ssl_ca_certs:
            raise ValueError("--ssl-cert-reqs needs --ssl-ca-certs (the CA of client certs)")
        if self.allow_credentials and "*" in self.allowed_origins:
            raise ValueError("--allow-credentials cannot be combined with --allowed-origins "
                             "'*'; list the origins explicitly")
