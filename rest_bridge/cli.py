"""`engine-bridge`: serve the OpenAI REST API in front of a running engine."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import uvicorn

from protoserve.tracing import check_tracing_available
from rest_bridge.app import create_app
from rest_bridge.chat_options import add_chat_args, chat_options_from_args
from rest_bridge.http_options import ENGINE_API_KEY_ENV, add_http_args
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
    parser.add_argument(
        "--engine-api-key",
        default=None,
        help=f"key sent to the engine as 'authorization: Bearer KEY' metadata (or set "
        f"{ENGINE_API_KEY_ENV}; default: the --api-key)",
    )
    parser.add_argument(
        "--metrics-compat", action="store_true",
        help="/metrics repeats every metric under the vllm: prefix",
    )
    parser.add_argument(
        "--otlp-traces-endpoint", default=None, metavar="URL",
        help="export OpenTelemetry spans to this OTLP endpoint (needs pip install "
        "'protoserve[otel]'); traceparent headers reach the engine either way",
    )
    add_http_args(parser)
    add_chat_args(parser)
    return parser


def _engine_address(value: str) -> str:
    try:
        return validate_engine_address(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def settings_from_args(args: argparse.Namespace) -> BridgeSettings:
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    return BridgeSettings(
        engine_address=args.engine_address,
        host=args.host,
        port=args.port,
        request_timeout=args.request_timeout,
        api_key=api_key,
        root_path=args.root_path,
        uvicorn_log_level=args.uvicorn_log_level,
        # One key for both hops is the common case (engine-serve --role all).
        engine_api_key=args.engine_api_key or os.environ.get(ENGINE_API_KEY_ENV) or api_key,
        allowed_origins=tuple(args.allowed_origins),
        allow_credentials=args.allow_credentials,
        allowed_methods=tuple(args.allowed_methods),
        allowed_headers=tuple(args.allowed_headers),
        disable_docs=args.disable_fastapi_docs,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        ssl_ca_certs=args.ssl_ca_certs,
        ssl_cert_reqs=args.ssl_cert_reqs,
        metrics_compat=args.metrics_compat,
        otlp_traces_endpoint=args.otlp_traces_endpoint,
        chat=chat_options_from_args(args),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
        check_tracing_available(settings.otlp_traces_endpoint)
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
        ssl_keyfile=settings.ssl_keyfile,
        ssl_certfile=settings.ssl_certfile,
        ssl_ca_certs=settings.ssl_ca_certs,
        ssl_cert_reqs=settings.ssl_cert_reqs,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
