"""`engine-bridge`: serve the OpenAI REST API in front of a running engine."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import uvicorn

from rest_bridge.app import create_app
from rest_bridge.settings import BridgeSettings, validate_engine_address

API_KEY_ENV = "PROTOSERVE_API_KEY"
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engine-bridge",
        description="OpenAI-compatible REST bridge: each request becomes a streaming gRPC "
        "call to the protoserve engine.",
    )
    parser.add_argument(
        "--engine-address",
        required=True,
        type=_engine_address,
        help="the engine's gRPC address: host:port, unix:/path or unix:///abs/path",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="bind port (default 8000)")
    parser.add_argument(
        "--uvicorn-log-level", default="info", choices=_LOG_LEVELS, help="default info"
    )
    parser.add_argument(
        "--root-path", default="", help="path prefix when served behind a proxy"
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="deadline of each engine call (default: none)",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1 routes (or set {API_KEY_ENV})",
    )
    return parser


def _engine_address(value: str) -> str:
    try:
        return validate_engine_address(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def settings_from_args(args: argparse.Namespace) -> BridgeSettings:
    return BridgeSettings(
        engine_address=args.engine_address,
        host=args.host,
        port=args.port,
        request_timeout=args.request_timeout,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        root_path=args.root_path,
        uvicorn_log_level=args.uvicorn_log_level,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(
        level=logging.DEBUG if settings.uvicorn_log_level in ("debug", "trace") else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.uvicorn_log_level,
        # Behind a path-prefix proxy: the server, not the app, owns the root path.
        root_path=settings.root_path,
        # Access lines only when debugging: at serving rates they drown the useful log lines.
        access_log=settings.uvicorn_log_level in ("debug", "trace"),
        timeout_graceful_shutdown=10,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
