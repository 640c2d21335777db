"""The bridge's HTTP surface options: CORS, TLS, API docs, connection limits, and the engine's
key.

`engine-serve` forwards the same flags to the bridge it starts, so they are parsed here once.
"""
from __future__ import annotations

import argparse
import json
import ssl

from typing import TYPE_CHECKING

from rest_bridge.http_limits import HttpLimits

if TYPE_CHECKING:  # engine-serve reads these flags too and never serves REST itself
    from fastapi import FastAPI

ENGINE_API_KEY_ENV = "PROTOSERVE_ENGINE_API_KEY"
# Hex SHA-256 of the engine's --admin-api-key, which the runtime LoRA routes then accept
# (engine-serve sets it for the bridge it starts; the key itself never reaches the bridge).
ADMIN_KEY_SHA256_ENV = "PROTOSERVE_ADMIN_API_KEY_SHA256"
CERT_REQS_CHOICES = (ssl.CERT_NONE, ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED)


def parse_str_list(text: str) -> list[str]:
    """A JSON list (`["https://a.example", "https://b.example"]`) or a comma-separated list."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not a JSON list: {exc.msg}") from None
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise argparse.ArgumentTypeError("expected a JSON list of strings")
        return value
    return [item.strip() for item in stripped.split(",") if item.strip()]


def add_http_args(parser: argparse.ArgumentParser) -> None:
    """CORS, TLS and docs flags; identical spellings on engine-bridge and engine-serve."""
    parser.add_argument(
        "--allowed-origins", type=parse_str_list, default=[],
        help="CORS origins allowed to call the REST API, as a JSON list or comma list "
        "(default: none, CORS off; '*' allows any origin)",
    )
    parser.add_argument("--allow-credentials", action="store_true",
                        help="CORS: allow cookies and Authorization headers cross-origin")
    parser.add_argument("--allowed-methods", type=parse_str_list, default=["*"],
                        help="CORS methods, JSON list or comma list (default: *)")
    parser.add_argument("--allowed-headers", type=parse_str_list, default=["*"],
                        help="CORS request headers, JSON list or comma list (default: *)")
    parser.add_argument("--disable-fastapi-docs", action="store_true",
                        help="serve no /docs, /redoc or /openapi.json")
    parser.add_argument("--ssl-keyfile", default=None, help="PEM private key: serve over TLS")
    parser.add_argument("--ssl-certfile", default=None, help="PEM certificate chain for TLS")
    parser.add_argument("--ssl-ca-certs", default=None,
                        help="PEM CA bundle that verifies client certificates")
    parser.add_argument(
        "--ssl-cert-reqs", type=int, choices=CERT_REQS_CHOICES, default=int(ssl.CERT_NONE),
        help="client certificates: 0 none, 1 optional, 2 required (default 0)",
    )
    add_limit_args(parser)


# Connection limits (rest_bridge/http_limits.py): flag -> HttpLimits field.
LIMIT_FLAGS = {
    "--max-header-bytes": "max_header_bytes",
    "--max-headers": "max_headers",
    "--header-timeout": "header_timeout_s",
    "--body-timeout": "body_timeout_s",
    "--keep-alive-timeout": "keep_alive_timeout_s",
    "--max-connections": "max_connections",
}


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    defaults = HttpLimits()
    parser.add_argument("--max-header-bytes", type=int, default=defaults.max_header_bytes,
                        help="request line and headers larger than this get 431")
    parser.add_argument("--max-headers", type=int, default=defaults.max_headers,
                        help="requests with more headers than this get 431")
    parser.add_argument("--header-timeout", type=float, default=defaults.header_timeout_s,
                        metavar="SECONDS", help="a request's headers must arrive within this "
                        "(from the connection or the request's first byte), else 408")
    parser.add_argument("--body-timeout", type=float, default=defaults.body_timeout_s,
                        metavar="SECONDS", help="a request body that sends nothing for this "
                        "long gets 408 and the connection closes")
    parser.add_argument("--keep-alive-timeout", type=int, default=defaults.keep_alive_timeout_s,
                        metavar="SECONDS", help="idle keep-alive connections close after this")
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections,
                        help="concurrent connections (and requests) beyond which new ones get "
                        "503")


def limits_from_args(args: argparse.Namespace) -> HttpLimits:
    return HttpLimits(**{field: getattr(args, flag.removeprefix("--").replace("-", "_"))
                         for flag, field in LIMIT_FLAGS.items()})


def install_cors(
    app: FastAPI,
    origins: tuple[str, ...],
    *,
    allow_credentials: bool,
    methods: tuple[str, ...],
    headers: tuple[str, ...],
) -> None:
    """Add CORS as the outermost middleware (call after every other add_middleware), so a
    preflight is answered before authentication and error responses carry CORS headers."""
    if not origins:
        return
    from fastapi.middleware.cors import CORSMiddleware

    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(origins),
        allow_credentials=allow_credentials,
        allow_methods=list(methods),
        allow_headers=list(headers),
    )
